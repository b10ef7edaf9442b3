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

/** Is this model (id or alias as the user typed it) loaded? From GET /models, which knows the aliases. */
export function isModelLoaded(models: ModelsResponse, name: string): boolean {
	return findModel(models, name)?.status === 'loaded';
}
