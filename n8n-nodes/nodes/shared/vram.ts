/** Check VRAM's decision: enough free GPU memory, or not. Pure (the tests call it directly). */
import type { IDataObject } from 'n8n-workflow';

export type WhenNoGpu = 'enough' | 'notEnough';

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

export function decideEnough(
	status: IDataObject,
	requiredMb: number | null,
	whenNoGpu: WhenNoGpu,
	model: string | null = null,
	modelLoaded = false,
): VramDecision {
	const free = typeof status?.free_mb === 'number' ? (status.free_mb as number) : null;
	const base = { free_mb: free, required_mb: requiredMb, model, gpu: free !== null };
	if (modelLoaded) {
		return { ...base, enough: true, reason: `${model} is already loaded: it needs no more memory` };
	}
	if (free === null) {
		return {
			...base,
			enough: whenNoGpu === 'enough',
			reason: `CPU mode: the sidecar reports no GPU memory (free_mb is null); treated as ${
				whenNoGpu === 'enough' ? 'enough' : 'not enough'
			}`,
		};
	}
	const need = requiredMb ?? 0;
	return free >= need
		? { ...base, enough: true, reason: `${free} MB free >= ${need} MB required` }
		: { ...base, enough: false, reason: `${free} MB free < ${need} MB required` };
}

/** Is this model (id or alias as the user typed it) among the status's loaded models, in state loaded? */
export function isModelLoaded(status: IDataObject, model: string): boolean {
	const loaded = (status?.loaded_models ?? {}) as IDataObject;
	for (const [id, entry] of Object.entries(loaded)) {
		const e = (entry ?? {}) as IDataObject;
		if ((id === model || e.model === model) && e.status === 'loaded') return true;
	}
	return false;
}
