/**
 * Building the /v1/chat/completions request and reading its answer. Pure functions: the node gathers the
 * parameters and binary data, these turn them into the OpenAI body (the tests call them directly).
 */
import type { IDataObject } from 'n8n-workflow';

import type { ChatCompletionRequest } from './api';

export interface ImageInput {
	mimeType: string;
	/** base64 without a data: prefix */
	base64: string;
	fileName?: string;
}

export interface ChatOptions {
	temperature?: number;
	maxTokens?: number;
	topP?: number;
	frequencyPenalty?: number;
	presencePenalty?: number;
	responseFormat?: 'text' | 'json_object';
	seed?: number;
	stop?: string;
}

/** One LoRA adapter's scale for this request (the n8n node's "LoRA Adapters" collection). */
export interface LoraScale {
	name: string;
	scale: number;
}

/** The sidecar's bound on a scale (registry.MAX_LORA_SCALE): 0 switches an adapter off for the request. */
export const MAX_LORA_SCALE = 10;

export interface ChatParams {
	model: string;
	messageMode: 'simple' | 'messages';
	systemPrompt?: string;
	userMessage?: string;
	/** a JSON string or an already parsed array of OpenAI messages */
	messages?: unknown;
	images?: ImageInput[];
	/** a JSON string or an already parsed array of OpenAI tools; empty: no tools */
	tools?: unknown;
	toolChoice?: 'auto' | 'none' | 'required' | 'function';
	toolChoiceFunction?: string;
	options?: ChatOptions;
	/** per-request LoRA adapter scales, by adapter name (GET /models/{model}/lora-adapters lists them) */
	lora?: LoraScale[];
}

export class ChatParameterError extends Error {}

export function toDataUrl(mimeType: string, data: string | Uint8Array): string {
	const base64 =
		typeof data === 'string'
			? data.replace(/^data:[^,]*,/, '')
			: Buffer.from(data).toString('base64');
	return `data:${mimeType || 'application/octet-stream'};base64,${base64}`;
}

/** A JSON parameter that may arrive as a string (typed in the UI) or already parsed (from an expression). */
export function parseJsonParameter(value: unknown, name: string): unknown {
	if (value === undefined || value === null) return undefined;
	if (typeof value !== 'string') return value;
	const s = value.trim();
	if (!s) return undefined;
	let problem: string;
	try {
		return JSON.parse(s);
	} catch (error) {
		problem = (error as Error).message;
	}
	throw new ChatParameterError(`${name} is not valid JSON: ${problem}`);
}

function normaliseTools(value: unknown): IDataObject[] | undefined {
	const parsed = parseJsonParameter(value, 'Tools');
	if (parsed === undefined) return undefined;
	const list = Array.isArray(parsed) ? parsed : [parsed];
	if (!list.length) return undefined;
	return list.map((tool, i) => {
		if (!tool || typeof tool !== 'object') {
			throw new ChatParameterError(`Tools[${i}] must be an object`);
		}
		const t = tool as IDataObject;
		// Accept both the OpenAI form {type: "function", function: {...}} and a bare function {name, parameters}.
		if (t.type === 'function' && t.function && typeof t.function === 'object') {
			const f = t.function as IDataObject;
			if (typeof f.name !== 'string' || !f.name) {
				throw new ChatParameterError(`Tools[${i}].function.name is missing`);
			}
			return t;
		}
		if (typeof t.name === 'string' && t.name) return { type: 'function', function: t };
		throw new ChatParameterError(
			`Tools[${i}] must be {"type": "function", "function": {"name": ..., "parameters": {...}}}`,
		);
	});
}

function normaliseMessages(value: unknown): IDataObject[] {
	const parsed = parseJsonParameter(value, 'Messages');
	if (!Array.isArray(parsed) || !parsed.length) {
		throw new ChatParameterError(
			'Messages must be a non-empty JSON array of {"role", "content"} objects',
		);
	}
	return parsed.map((m, i) => {
		if (!m || typeof m !== 'object' || typeof (m as IDataObject).role !== 'string') {
			throw new ChatParameterError(`Messages[${i}] needs a "role"`);
		}
		return { ...(m as IDataObject) };
	});
}

/** Put images into a message's content as OpenAI image_url parts (text first, then the images). */
function withImages(message: IDataObject, images: ImageInput[]): IDataObject {
	const parts: IDataObject[] = [];
	const content = message.content;
	if (Array.isArray(content)) parts.push(...(content as IDataObject[]));
	else if (typeof content === 'string' && content) parts.push({ type: 'text', text: content });
	for (const image of images) {
		parts.push({ type: 'image_url', image_url: { url: toDataUrl(image.mimeType, image.base64) } });
	}
	return { ...message, content: parts };
}

export function buildChatBody(p: ChatParams): ChatCompletionRequest {
	if (!p.model) throw new ChatParameterError('Choose a model');
	let messages: IDataObject[];
	if (p.messageMode === 'messages') {
		messages = normaliseMessages(p.messages);
	} else {
		messages = [];
		if (p.systemPrompt) messages.push({ role: 'system', content: p.systemPrompt });
		messages.push({ role: 'user', content: p.userMessage ?? '' });
		if (!p.userMessage && !p.images?.length) {
			throw new ChatParameterError('The user message is empty');
		}
	}
	const images = p.images ?? [];
	if (images.length) {
		let last = -1;
		for (let i = messages.length - 1; i >= 0; i--) {
			if (messages[i].role === 'user') {
				last = i;
				break;
			}
		}
		if (last === -1) messages.push(withImages({ role: 'user', content: '' }, images));
		else messages[last] = withImages(messages[last], images);
	}

	const body: ChatCompletionRequest = {
		model: p.model,
		messages: messages as ChatCompletionRequest['messages'],
		stream: false,
	};
	const tools = normaliseTools(p.tools);
	if (tools) {
		body.tools = tools;
		const choice = p.toolChoice ?? 'auto';
		if (choice === 'function') {
			if (!p.toolChoiceFunction) throw new ChatParameterError('Name the function for Tool Choice');
			body.tool_choice = { type: 'function', function: { name: p.toolChoiceFunction } };
		} else {
			body.tool_choice = choice;
		}
	}
	const o = p.options ?? {};
	if (o.temperature !== undefined) body.temperature = o.temperature;
	if (o.maxTokens !== undefined && o.maxTokens > 0) body.max_tokens = o.maxTokens;
	if (o.topP !== undefined) body.top_p = o.topP;
	if (o.frequencyPenalty !== undefined) body.frequency_penalty = o.frequencyPenalty;
	if (o.presencePenalty !== undefined) body.presence_penalty = o.presencePenalty;
	if (o.seed !== undefined) body.seed = o.seed;
	if (o.stop) {
		const stops = o.stop
			.split(',')
			.map((s) => s.trim())
			.filter(Boolean);
		if (stops.length) body.stop = stops;
	}
	if (o.responseFormat === 'json_object') body.response_format = { type: 'json_object' };
	const lora = normaliseLora(p.lora);
	if (lora.length) body.lora = lora;
	return body;
}

function normaliseLora(entries: LoraScale[] | undefined): LoraScale[] {
	const seen = new Set<string>();
	return (entries ?? []).map((e, i) => {
		const name = typeof e?.name === 'string' ? e.name.trim() : '';
		if (!name) throw new ChatParameterError(`LoRA Adapters[${i}]: name the adapter`);
		if (seen.has(name)) throw new ChatParameterError(`LoRA Adapters: "${name}" is listed twice`);
		seen.add(name);
		const scale = Number(e.scale);
		if (typeof e.scale === 'boolean' || !Number.isFinite(scale) || scale < 0 || scale > MAX_LORA_SCALE) {
			throw new ChatParameterError(
				`LoRA Adapters[${i}] ("${name}"): the scale must be a number from 0 (off) to ${MAX_LORA_SCALE}`,
			);
		}
		return { name, scale };
	});
}

/** The node's output: the answer's content, tool calls (arguments parsed when they are JSON), usage, finish. */
export function parseChatResponse(response: IDataObject): IDataObject {
	const choices = Array.isArray(response?.choices) ? (response.choices as IDataObject[]) : [];
	if (!choices.length) throw new Error('The sidecar answered without choices');
	const choice = choices[0];
	const message = (choice.message ?? {}) as IDataObject;
	const rawCalls = Array.isArray(message.tool_calls) ? (message.tool_calls as IDataObject[]) : [];
	const toolCalls = rawCalls.map((call) => {
		const fn = (call.function ?? {}) as IDataObject;
		let args: unknown = fn.arguments;
		if (typeof args === 'string') {
			try {
				args = JSON.parse(args);
			} catch {
				// keep the raw string: the model wrote something that is not JSON
			}
		}
		return { id: call.id, type: call.type ?? 'function', name: fn.name, arguments: args };
	});
	return {
		content: typeof message.content === 'string' ? message.content : (message.content ?? null),
		...(typeof message.reasoning_content === 'string' && message.reasoning_content
			? { reasoning_content: message.reasoning_content }
			: {}),
		tool_calls: toolCalls,
		finish_reason: choice.finish_reason ?? null,
		usage: response.usage ?? null,
		model: response.model ?? null,
		id: response.id ?? null,
	};
}

/** Which binary properties of an item go to the model as images. */
export function selectImageProperties(
	binary: Record<string, { mimeType?: string }> | undefined,
	mode: 'auto' | 'properties' | 'none',
	names: string,
): string[] {
	if (mode === 'none' || !binary) {
		if (mode === 'properties' && names.trim()) {
			throw new ChatParameterError(`The item has no binary data (wanted: ${names})`);
		}
		return [];
	}
	if (mode === 'auto') {
		return Object.keys(binary).filter((k) => (binary[k]?.mimeType ?? '').startsWith('image/'));
	}
	const wanted = names
		.split(',')
		.map((s) => s.trim())
		.filter(Boolean);
	for (const name of wanted) {
		if (!binary[name]) {
			throw new ChatParameterError(
				`The item has no binary property "${name}" (it has: ${Object.keys(binary).join(', ') || 'none'})`,
			);
		}
	}
	return wanted;
}
