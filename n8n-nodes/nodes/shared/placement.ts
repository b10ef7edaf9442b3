/**
 * Which node of a fleet takes a model: pure functions over what each sidecar answered (the tests call them
 * directly). Nothing here judges memory: each sidecar's own `POST /models/estimate` verdict (`fit`, the same
 * admission code a load runs) says whether the model fits there now, or after evicting idle models it may evict.
 *
 * Order: a node that holds the model (loaded, then loading or downloading: a load under way is joined); else a
 * node where it fits now (most free GPU memory first, then fewest models loaded); else one where it fits after
 * evicting (fewest evictions first); else one whose sidecar could not estimate it (an unreadable file, the Hub
 * offline: a load there answers with the sidecar's own error); ties keep the credential's order. Nodes where it
 * does not fit, that do not have it, or that did not answer are refused. A node that alone has the model (`sole`)
 * gets it without an estimate: its own load decides, as with one machine.
 */
import type { EstimateResponse } from './api';

export type Verdict = 'held' | 'sole' | 'fits' | 'evicts' | 'unknown' | 'refused';

export interface Candidate {
	url: string;
	node: string;
	verdict: Verdict;
	/** the sidecar's reason, or why the node is not a candidate */
	reason: string;
	/** its registry id of the model (the name asked for may be an alias) */
	model: string;
	/** held: the model's state there (loaded, loading, downloading) */
	state?: string;
	/** evicts: what the load there would unload first */
	evict: string[];
	/** free GPU memory of the node (null in CPU mode) */
	freeMb: number | null;
	/** models loaded on the node */
	loaded: number;
	/** refused: the error code a load would be refused with (insufficient_vram, too_many_models, ...) */
	code?: string | null;
	estimate?: EstimateResponse;
	/** unknown: the sidecar's error to its estimate */
	error?: Error;
}

const HOLDING = ['loaded', 'loading', 'downloading'];

export function holds(state: string | undefined): boolean {
	return HOLDING.includes(state ?? '');
}

/** One sidecar's fit verdict as a candidate's verdict. `fits` is null in CPU mode: the cap still decides. */
export function verdictOf(fit: EstimateResponse['fit']): 'fits' | 'evicts' | 'refused' {
	const evict = fit.evict ?? [];
	if (fit.fits === true || (fit.fits === null && fit.fits_after_eviction && !evict.length))
		return 'fits';
	return fit.fits_after_eviction ? 'evicts' : 'refused';
}

const ORDER: Record<Verdict, number> = {
	held: 0,
	sole: 1,
	fits: 2,
	evicts: 3,
	unknown: 4,
	refused: 5,
};

/** Candidates best first (stable: equal ones keep their order); refused ones last. */
export function rank(candidates: Candidate[]): Candidate[] {
	const score = (c: Candidate): number[] => [
		ORDER[c.verdict],
		c.verdict === 'held' ? HOLDING.indexOf(c.state ?? '') : 0,
		c.verdict === 'evicts' ? c.evict.length : 0,
		-(c.freeMb ?? 0),
		c.loaded,
	];
	return candidates
		.map((c, i) => ({ c, i, s: score(c) }))
		.sort((a, b) => {
			for (let k = 0; k < a.s.length; k++) if (a.s[k] !== b.s[k]) return a.s[k] - b.s[k];
			return a.i - b.i;
		})
		.map((x) => x.c);
}

/** Why the chosen node was chosen, for the output's `placement`. */
export function placementReason(c: Candidate): string {
	if (c.verdict === 'held') return `${c.model} is ${c.state} on ${c.node}`;
	if (c.verdict === 'sole') return `${c.model} is in the registry of ${c.node} alone`;
	if (c.verdict === 'fits') return `${c.model} fits on ${c.node} now: ${c.reason}`;
	if (c.verdict === 'unknown')
		return `${c.model} goes to ${c.node}, which could not estimate it: ${c.reason}`;
	return `${c.model} fits on ${c.node} after evicting ${c.evict.join(', ')}: ${c.reason}`;
}
