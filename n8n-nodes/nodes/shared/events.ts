/**
 * The sidecar's event stream (GET /models/events, server-sent events) as the trigger node reads it: which event
 * types each trigger choice listens to, the query string, and an incremental parser of the SSE text.
 */
import type { IDataObject } from 'n8n-workflow';

/** The trigger's choices and the sidecar event types behind each (events.py EVENT_TYPES owns the types). */
export const TRIGGER_EVENTS: Record<string, string[]> = {
	loaded: ['loaded'],
	evicted: ['evicted'],
	failed: ['load_failed', 'crashed'],
	memoryLow: ['memory_low'],
	unloaded: ['unloaded'],
	stateChanged: ['state'],
};

/** The query string for the chosen triggers and models ("" parts left out). */
export function eventsQuery(choices: string[], models: string[]): IDataObject {
	const types = new Set<string>();
	for (const c of choices) for (const t of TRIGGER_EVENTS[c] ?? []) types.add(t);
	const qs: IDataObject = {};
	if (types.size) qs.types = [...types].join(',');
	const m = models.map((s) => s.trim()).filter(Boolean);
	if (m.length) qs.model = m.join(',');
	return qs;
}

export interface SseEvent {
	id?: string;
	event: string;
	data: IDataObject;
}

/** Feed it chunks of the stream as they arrive; it returns the complete events (comments and blanks skipped). */
export class SseParser {
	private buffer = '';

	lastEventId: string | undefined;

	push(chunk: string): SseEvent[] {
		this.buffer += chunk.replace(/\r\n/g, '\n');
		const out: SseEvent[] = [];
		let end: number;
		while ((end = this.buffer.indexOf('\n\n')) >= 0) {
			const block = this.buffer.slice(0, end);
			this.buffer = this.buffer.slice(end + 2);
			let id: string | undefined;
			let event = 'message';
			const data: string[] = [];
			for (const line of block.split('\n')) {
				if (!line || line.startsWith(':')) continue;
				const colon = line.indexOf(':');
				const field = colon < 0 ? line : line.slice(0, colon);
				const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
				if (field === 'id') id = value;
				else if (field === 'event') event = value;
				else if (field === 'data') data.push(value);
			}
			if (!data.length) continue;
			if (id !== undefined) this.lastEventId = id;
			let parsed: IDataObject;
			try {
				parsed = JSON.parse(data.join('\n')) as IDataObject;
			} catch {
				parsed = { data: data.join('\n') };
			}
			out.push({ id, event, data: parsed });
		}
		return out;
	}
}
