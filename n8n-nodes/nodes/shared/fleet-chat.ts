/**
 * A chat request over the fleet, for the Chat node and the Chat Model sub-node: sent to the node that holds the
 * model (sticky), else to the node placement.ts picks (the sidecar there loads it on demand). A node that stops
 * answering (refused or reset connection, or a sidecar shutting down) is left for the rest of the execution and
 * the request goes to the next node; when none is left the error names each node and why.
 *
 * The Timeout covers the whole wait: the sidecar queues a request whose model is not ready (a load, other
 * requests first) and gives up after `X-Queue-Timeout-S` (503 queue_timeout, saying what it waited for); the node
 * sends its Timeout there and waits HTTP_MARGIN_S longer, so that answer arrives before its own HTTP timeout. How
 * long the request waited comes back in `X-Queue-Wait-Ms` (the output's `queue_wait_s`).
 */
import type { IDataObject } from 'n8n-workflow';

import { fleetError, type Fleet } from './fleet';
import { asNodeError, type SidecarRequest } from './transport';

export const QUEUE_TIMEOUT_HEADER = 'X-Queue-Timeout-S';
export const QUEUE_WAIT_HEADER = 'x-queue-wait-ms';
/** The node's HTTP timeout is its Timeout plus this: the sidecar's own queue_timeout answer comes first. */
export const HTTP_MARGIN_S = 5;

/** The POST /v1/chat/completions request for a body and a Timeout in seconds (pure: the tests check it). */
export function chatRequest(body: IDataObject, timeoutS: number): SidecarRequest {
	return {
		method: 'POST',
		path: '/v1/chat/completions',
		body,
		headers: { [QUEUE_TIMEOUT_HEADER]: String(timeoutS) },
		timeoutMs: (timeoutS + HTTP_MARGIN_S) * 1000,
		fullResponse: true,
	};
}

/** X-Queue-Wait-Ms as seconds; null when the sidecar did not send it (an older one). */
export function queueWaitS(headers: unknown): number | null {
	const h = (headers ?? {}) as Record<string, unknown>;
	const key = Object.keys(h).find((k) => k.toLowerCase() === QUEUE_WAIT_HEADER);
	const raw = key === undefined ? undefined : h[key];
	const ms = Number(Array.isArray(raw) ? raw[0] : raw);
	return key !== undefined && Number.isFinite(ms) ? Math.round(ms) / 1000 : null;
}

export interface Routed {
	node: string;
	url: string;
	body: IDataObject;
	queue_wait_s: number | null;
}

/** Send one chat request for `model` to the node that holds it (or takes it), moving on when a node is gone. */
export async function chatOnFleet(
	fleet: Fleet,
	model: string,
	req: SidecarRequest,
	itemIndex?: number,
): Promise<Routed> {
	for (let attempt = 0; attempt < fleet.urls.length; attempt++) {
		const { chosen } = await fleet.choose(model, itemIndex);
		try {
			const full = await fleet.request<{ body: IDataObject; headers: IDataObject }>(
				chosen.url,
				req,
				itemIndex,
			);
			return {
				node: fleet.node(chosen.url),
				url: chosen.url,
				body: full.body,
				queue_wait_s: queueWaitS(full.headers),
			};
		} catch (error) {
			// that node stopped answering: the next choice leaves it out
			if (!fleet.isGone(chosen.url)) throw asNodeError(fleet.ctx.getNode(), error, itemIndex);
		}
	}
	const gone = fleet.skipped.map((s) => s.message).join('; ');
	throw fleetError(
		fleet.ctx,
		'no_sidecar_answered',
		`No sidecar answered for ${model}: ${gone}`,
		undefined,
		itemIndex,
	);
}
