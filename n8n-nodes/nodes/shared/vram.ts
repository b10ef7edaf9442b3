/**
 * Check VRAM's decision: "Enough" or "Not Enough". Pure (the tests call it directly).
 *
 * - For a model, the sidecar decides: `POST /models/estimate` answers with `fit`, the verdict of the same admission
 *   code a load runs (margin, reservations, other processes, per-GPU placement, the model cap, what it would evict).
 *   Nothing of admission is re-implemented here; this only says which of the sidecar's verdicts count as enough.
 * - For a number of MB the sidecar has no verdict, so the rule is the simple documented one: the status's
 *   `free_mb` (NVML's free memory, summed over the GPUs) against the number, without margin or reservations.
 */
import type { IDataObject } from 'n8n-workflow';

import type { EstimateResponse, ModelInfo, ModelsResponse, StatusResponse } from './api';

export type WhenNoGpu = 'enough' | 'notEnough';
/** A load that would first evict idle models: "enough" (the load evicts them itself) or "not enough" (free first). */
export type WhenEviction = 'enough' | 'notEnough';

export interface VramDecision extends IDataObject {
	enough: boolean;
	/** false in CPU mode: the sidecar sees no GPU and reports free_mb = null */
	gpu: boolean;
	free_mb: number | null;
	required_mb: number | null;
	/** the model asked about, in "enough for model" mode */
	model: string | null;
	reason: string;
}

/** "Required Free MB": free memory as the status reports it against a number (no margin, no reservations). */
export function decideForMb(
	status: Pick<StatusResponse, 'free_mb'>,
	requiredMb: number,
	whenNoGpu: WhenNoGpu,
): VramDecision {
	const free = typeof status?.free_mb === 'number' ? status.free_mb : null;
	const base = { free_mb: free, required_mb: requiredMb, model: null, gpu: free !== null };
	if (free === null) {
		return {
			...base,
			enough: whenNoGpu === 'enough',
			reason: `CPU mode: the sidecar reports no GPU memory (free_mb is null); treated as ${
				whenNoGpu === 'enough' ? 'enough' : 'not enough'
			}`,
		};
	}
	return free >= requiredMb
		? { ...base, enough: true, reason: `${free} MB free >= ${requiredMb} MB required` }
		: { ...base, enough: false, reason: `${free} MB free < ${requiredMb} MB required` };
}

/** "Enough for Model": the sidecar's own fit verdict from POST /models/estimate. */
export function decideForModel(
	answer: EstimateResponse,
	freeMb: number | null,
	whenEviction: WhenEviction,
): VramDecision {
	const fit = answer.fit;
	const evict = fit.evict ?? [];
	// `fits` is null in CPU mode (no memory to account); the cap still decides, with nothing to evict = fits
	const fitsAsIs = fit.fits ?? (fit.fits_after_eviction && evict.length === 0);
	const enough = fitsAsIs || (whenEviction === 'enough' && fit.fits_after_eviction);
	let reason = fit.reason;
	if (!fitsAsIs && fit.fits_after_eviction) {
		reason += enough
			? ` (the load evicts ${evict.join(', ')} by itself)`
			: ` (not enough without evicting ${evict.join(', ')} first)`;
	}
	return {
		enough,
		gpu: fit.fits !== null && fit.fits !== undefined,
		free_mb: freeMb,
		required_mb: Math.ceil(answer.estimate.total_mb),
		model: answer.model,
		reason,
		fit: fit as unknown as IDataObject,
		estimate: answer.estimate as unknown as IDataObject,
	};
}

/** A model's registry entry by id or alias, from GET /models. */
export function findModel(models: ModelsResponse, name: string): ModelInfo | undefined {
	const list = Array.isArray(models?.models) ? models.models : [];
	return list.find((m) => m.id === name) ?? list.find((m) => (m.aliases ?? []).includes(name));
}

/** One node's answer to a question of the fleet (fleet.ts's survey). */
export interface NodeAnswer<T> {
	node: string;
	url: string;
	body: T;
}

/**
 * Check VRAM's status over a fleet: the guide's fields at the top as the fleet's total (summed over the nodes with
 * a GPU; null when none has one), `loaded_models` of every node (each entry with its `node`; a model loaded on two
 * nodes appears twice, the second as `id@node`), `gpus` and `reservations` with their node, each node's own status
 * in `nodes`, and who did not answer in `skipped`. With one node the top is that node's status.
 */
export function fleetStatus(
	answers: Array<NodeAnswer<StatusResponse>>,
	skipped: IDataObject[],
): IDataObject {
	const withGpu = answers.filter((a) => a.body.mode === 'gpu');
	const sum = (key: 'total_mb' | 'used_mb' | 'free_mb') =>
		withGpu.length ? withGpu.reduce((n, a) => n + (a.body[key] ?? 0), 0) : null;
	const utils = withGpu
		.map((a) => a.body.utilization_percent)
		.filter((u): u is number => typeof u === 'number');
	const loaded: IDataObject = {};
	for (const a of answers) {
		for (const [id, m] of Object.entries(a.body.loaded_models ?? {})) {
			loaded[id in loaded ? `${id}@${a.node}` : id] = { ...(m as IDataObject), node: a.node };
		}
	}
	const one = answers.length === 1 ? answers[0] : undefined;
	const cpu = answers.filter((a) => a.body.mode === 'cpu').map((a) => a.node);
	return {
		...(one ? (one.body as unknown as IDataObject) : {}),
		node: one ? one.node : null,
		mode: withGpu.length ? 'gpu' : 'cpu',
		total_mb: sum('total_mb'),
		used_mb: sum('used_mb'),
		free_mb: sum('free_mb'),
		utilization_percent: utils.length
			? Math.round((10 * utils.reduce((n, u) => n + u, 0)) / utils.length) / 10
			: null,
		loaded_models: loaded,
		gpus: answers.flatMap((a) => (a.body.gpus ?? []).map((g) => ({ ...g, node: a.node }))),
		reservations: answers.flatMap((a) =>
			(a.body.reservations ?? []).map((r) => ({ ...r, node: a.node })),
		),
		...(one
			? {}
			: {
					driver_version: null,
					note: cpu.length ? `CPU mode on ${cpu.join(', ')}: no GPU memory reported there` : null,
				}),
		nodes: answers.map((a) => ({
			node: a.node,
			url: a.url,
			...(a.body as unknown as IDataObject),
		})),
		skipped,
	};
}

/** "Required Free MB" over a fleet: enough when one node has that much free (a model runs on one node). */
export function decideForMbFleet(
	answers: Array<NodeAnswer<StatusResponse>>,
	requiredMb: number,
	whenNoGpu: WhenNoGpu,
): VramDecision {
	const each = answers.map((a) => ({ a, d: decideForMb(a.body, requiredMb, whenNoGpu) }));
	const best =
		[...each].sort(
			(x, y) =>
				Number(y.d.enough) - Number(x.d.enough) || (y.d.free_mb ?? -1) - (x.d.free_mb ?? -1),
		)[0] ?? each[0];
	return {
		...best.d,
		node: best.a.node,
		reason: answers.length > 1 ? `${best.a.node}: ${best.d.reason}` : best.d.reason,
		nodes: each.map(({ a, d }) => ({
			node: a.node,
			enough: d.enough,
			free_mb: d.free_mb,
			reason: d.reason,
		})),
	};
}
