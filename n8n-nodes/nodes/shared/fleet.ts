/**
 * The sidecars a credential names, as one fleet. The credential's Base URL is one URL, several (commas, spaces or
 * new lines between them), or one URL whose sidecar lists the others (`GET /fleet`: its MODEL_ORCHESTRATOR_FLEET,
 * e.g. a Kubernetes headless Service's DNS name, resolved there; a community node may not resolve DNS itself).
 *
 * No central service decides: every question goes to every sidecar and each answers for its own GPUs
 * (placement.ts picks from the answers). Every request names its node in its errors; a node that does not answer
 * within PROBE_TIMEOUT_MS is skipped with a message saying so, and is not asked again during this execution.
 */
import type { IDataObject, JsonObject } from 'n8n-workflow';
import { NodeApiError } from 'n8n-workflow';

import type { EstimateResponse, ModelsResponse, StatusResponse } from './api';
import { holds, rank, verdictOf, type Candidate } from './placement';
import {
	CREDENTIAL_NAME,
	callSidecar,
	extractSidecarError,
	normaliseBaseUrl,
	type SidecarContext,
	type SidecarRequest,
} from './transport';
import { findModel } from './vram';

/** How long a sidecar has to answer a short question (its status, its registry) before it is skipped. */
export const PROBE_TIMEOUT_MS = 5_000;
/** An estimate may read a GGUF header from the Hub first. */
export const ESTIMATE_TIMEOUT_MS = 60_000;

/** The credential's Base URL field as base URLs: one, or several separated by commas, spaces or new lines. */
export function credentialUrls(value: unknown): string[] {
	const parts = String(value ?? '')
		.split(/[\s,;]+/)
		.filter(Boolean);
	if (!parts.length) throw new Error('The Model Orchestrator credential has no base URL');
	return [...new Set(parts.map(normaliseBaseUrl))];
}

/** "http://10.0.0.5:8000" -> "10.0.0.5:8000": a node's name until its sidecar told its own. */
export function hostOf(url: string): string {
	return url.replace(/^https?:\/\//i, '');
}

const UNREACHABLE = [
	'ECONNREFUSED',
	'ECONNRESET',
	'ECONNABORTED',
	'ETIMEDOUT',
	'ESOCKETTIMEDOUT',
	'EHOSTUNREACH',
	'ENETUNREACH',
	'EHOSTDOWN',
	'ENOTFOUND',
	'EAI_AGAIN',
	'EPIPE',
	'UND_ERR_SOCKET',
	'UND_ERR_CONNECT_TIMEOUT',
	'UND_ERR_HEADERS_TIMEOUT',
];
const UNREACHABLE_MESSAGE = new RegExp(
	`${UNREACHABLE.join('|')}|socket hang up|timeout of \\d+ms exceeded|timed out|network error`,
	'i',
);

/** Did the request get no answer at all (refused, reset, timed out), as opposed to an error answer? */
export function isUnreachable(error: unknown): boolean {
	const info = extractSidecarError(error);
	if (info.httpCode) return false;
	if (UNREACHABLE.includes(info.code ?? '')) return true;
	const seen = new Set<unknown>();
	const stack: unknown[] = [error];
	while (stack.length) {
		const e = stack.pop() as IDataObject | undefined;
		if (!e || typeof e !== 'object' || seen.has(e)) continue;
		seen.add(e);
		if (UNREACHABLE.includes(String(e.code ?? ''))) return true;
		if (typeof e.message === 'string' && UNREACHABLE_MESSAGE.test(e.message)) return true;
		stack.push(e.cause, e.context, e.error);
	}
	return false;
}

const TIMEOUT = /ETIMEDOUT|ECONNABORTED|ESOCKETTIMEDOUT|UND_ERR_\w*TIMEOUT|timeout|timed out/i;

/** Was it the request's own time limit that ended it? */
export function isTimeout(error: unknown): boolean {
	const info = extractSidecarError(error);
	return !info.httpCode && (TIMEOUT.test(info.code ?? '') || TIMEOUT.test(info.message));
}

/** A node that was skipped: who, and why (in the output's `skipped`). */
export interface Skipped {
	node: string;
	url: string;
	message: string;
	code: string | null;
}

export interface Answer<T> {
	url: string;
	node: string;
	body: T;
}

/** An error of one node: the sidecar's message prefixed with the node's name; `context.node` names it too. */
export function nodeError(
	ctx: SidecarContext,
	node: string,
	url: string,
	error: unknown,
	itemIndex?: number,
): NodeApiError {
	const info = extractSidecarError(error);
	const unreachable = isUnreachable(error);
	const message = unreachable
		? `${node} (${url}) did not answer: ${info.message}`
		: `${node}: ${info.message}`;
	const description = [
		info.code ? `code: ${info.code}` : undefined,
		info.httpCode ? `HTTP ${info.httpCode}` : undefined,
		`node: ${node} (${url})`,
		unreachable ? 'check the Base URL of the Model Orchestrator credential' : undefined,
	]
		.filter(Boolean)
		.join(', ');
	const payload = (info.body ?? { error: { message } }) as JsonObject;
	const e = new NodeApiError(ctx.getNode(), payload, {
		message,
		description,
		httpCode: info.httpCode,
		itemIndex,
	});
	e.message = message; // NodeApiError puts a generic text ("perhaps it is offline") over one naming ECONNREFUSED
	e.context = { ...e.context, node, url, code: info.code ?? null, unreachable };
	return e;
}

/** A NodeApiError of the fleet as a whole (nothing answered, no node can take the model). */
export function fleetError(
	ctx: SidecarContext,
	code: string,
	message: string,
	httpCode: string | undefined,
	itemIndex?: number,
): NodeApiError {
	const e = new NodeApiError(ctx.getNode(), { error: { code, message } } as JsonObject, {
		message,
		description: `code: ${code}`,
		httpCode,
		itemIndex,
	});
	e.message = message; // as nodeError: the message names the nodes and what each said
	e.context = { ...e.context, node: null, code };
	return e;
}

/** What every sidecar said about one model, best candidate first (placement.ts's order). */
export interface Assessment {
	model: string;
	candidates: Candidate[];
	skipped: Skipped[];
}

export class Fleet {
	private readonly names = new Map<string, string>();

	private readonly gone = new Map<string, Skipped>();

	constructor(
		readonly ctx: SidecarContext,
		readonly urls: string[],
	) {}

	/** The credential's sidecars; one URL is asked for its fleet (GET /fleet), an older sidecar without it is alone. */
	static async open(ctx: SidecarContext): Promise<Fleet> {
		const credentials = await ctx.getCredentials(CREDENTIAL_NAME);
		const urls = credentialUrls(credentials.baseUrl);
		if (urls.length > 1) return new Fleet(ctx, urls);
		try {
			const answer = (await callSidecar.call(ctx, urls[0], {
				method: 'GET',
				path: '/fleet',
				timeoutMs: PROBE_TIMEOUT_MS,
			})) as IDataObject;
			const members = Array.isArray(answer?.members) ? (answer.members as string[]) : [];
			const fleet = new Fleet(ctx, members.length ? members.map(normaliseBaseUrl) : urls);
			if (!members.length && typeof answer?.node === 'string')
				fleet.names.set(urls[0], answer.node);
			return fleet;
		} catch {
			return new Fleet(ctx, urls); // an older sidecar (404), or none: the first real question says why
		}
	}

	/** The node's name: what its sidecar calls itself (MODEL_ORCHESTRATOR_NODE_NAME), else host:port. */
	node(url: string): string {
		return this.names.get(url) ?? hostOf(url);
	}

	/** The URL of the node with this name (or host:port), if it is a member. */
	urlOf(node: string): string | undefined {
		return this.urls.find((u) => this.node(u) === node || hostOf(u) === node);
	}

	isGone(url: string): boolean {
		return this.gone.has(url);
	}

	get live(): string[] {
		return this.urls.filter((u) => !this.gone.has(u));
	}

	/** The nodes skipped so far (they did not answer), in the credential's order. */
	get skipped(): Skipped[] {
		return this.urls.filter((u) => this.gone.has(u)).map((u) => this.gone.get(u)!);
	}

	/** One request to one member. A node that does not answer is marked gone; errors name the node. */
	async request<T = IDataObject>(url: string, req: SidecarRequest, itemIndex?: number): Promise<T> {
		try {
			const answer = (await callSidecar.call(this.ctx, url, req)) as IDataObject;
			const body = (req.fullResponse ? answer?.body : answer) as IDataObject | undefined;
			if (body && typeof body.node === 'string' && body.node) this.names.set(url, body.node);
			return answer as T;
		} catch (error) {
			const e = nodeError(this.ctx, this.node(url), url, error, itemIndex);
			// gone: no connection, no answer to a short question, or a sidecar shutting down (a long request that
			// ran out of its own time says nothing about the node)
			const gone =
				(e.context.unreachable &&
					(!isTimeout(error) || (req.timeoutMs ?? 0) <= PROBE_TIMEOUT_MS)) ||
				e.context.code === 'shutting_down';
			if (gone) {
				this.gone.set(url, {
					node: this.node(url),
					url,
					message: e.message,
					code: (e.context.code as string) ?? null,
				});
			}
			throw e;
		}
	}

	/**
	 * The same GET to every live member at once (each within PROBE_TIMEOUT_MS). Who did not answer is skipped; who
	 * answered with an error too, for this question. Throws when nobody answered: that one node's error, or all.
	 */
	async survey<T = IDataObject>(path: string, itemIndex?: number): Promise<Array<Answer<T>>> {
		const live = this.live;
		const results = await Promise.allSettled(
			live.map(
				async (url) =>
					await this.request<T>(
						url,
						{ method: 'GET', path, timeoutMs: PROBE_TIMEOUT_MS },
						itemIndex,
					),
			),
		);
		const answers: Array<Answer<T>> = [];
		const errors: NodeApiError[] = [];
		results.forEach((r, i) => {
			if (r.status === 'fulfilled')
				answers.push({ url: live[i], node: this.node(live[i]), body: r.value });
			else errors.push(r.reason as NodeApiError);
		});
		if (answers.length) return answers;
		if (errors.length === 1) throw errors[0];
		const gone = this.skipped.map((s) => s.message);
		throw fleetError(
			this.ctx,
			'no_sidecar_answered',
			`No sidecar answered: ${[...errors.map((e) => e.message), ...(live.length ? [] : gone)].join('; ')}`,
			undefined,
			itemIndex,
		);
	}

	/**
	 * Every sidecar's view of `model`: who holds it (GET /models, which knows the aliases), else each one's own fit
	 * verdict (POST /models/estimate). `node` restricts the answer to the node of that name. `verdicts: false`: when
	 * one node alone has the model there is nothing to choose, and its own load or chat decides (no estimate asked).
	 */
	async assess(
		model: string,
		itemIndex?: number,
		node?: string,
		verdicts = true,
	): Promise<Assessment> {
		let answers = await this.survey<ModelsResponse>('/models', itemIndex);
		if (node) {
			answers = answers.filter((a) => a.node === node || hostOf(a.url) === node);
			if (!answers.length) {
				throw fleetError(
					this.ctx,
					'node_not_found',
					`No node ${node} answered (nodes: ${this.urls.map((u) => this.node(u)).join(', ')})`,
					'404',
					itemIndex,
				);
			}
		}
		const base = (a: Answer<ModelsResponse>) => ({
			url: a.url,
			node: a.node,
			evict: [] as string[],
			freeMb: null as number | null,
			loaded: (a.body.models ?? []).filter((m) => m.status === 'loaded').length,
		});
		const candidates: Candidate[] = [];
		const pending: Array<{ a: Answer<ModelsResponse>; id: string }> = [];
		for (const a of answers) {
			const info = findModel(a.body, model);
			if (!info) {
				const known = (a.body.models ?? []).map((m) => m.id).join(', ');
				candidates.push({
					...base(a),
					model,
					verdict: 'refused',
					code: 'model_not_found',
					reason: `not in its registry (known: ${known || 'none'})`,
				});
			} else if (holds(info.status)) {
				candidates.push({
					...base(a),
					model: info.id,
					verdict: 'held',
					state: info.status,
					reason: '',
				});
			} else {
				pending.push({ a, id: info.id });
			}
		}
		if (!verdicts && pending.length === 1 && !candidates.some((c) => c.verdict === 'held')) {
			const { a, id } = pending[0];
			candidates.push({
				...base(a),
				model: id,
				verdict: 'sole',
				reason: 'the only node with it in its registry',
			});
		} else if (!candidates.some((c) => c.verdict === 'held')) {
			candidates.push(
				...(await Promise.all(
					pending.map(async (p) => await this.estimate(p.a, p.id, base(p.a), itemIndex)),
				)),
			);
		}
		const order = (c: Candidate) => this.urls.indexOf(c.url);
		return {
			model,
			candidates: rank(candidates.sort((x, y) => order(x) - order(y))),
			skipped: this.skipped,
		};
	}

	private async estimate(
		a: Answer<ModelsResponse>,
		id: string,
		base: Omit<Candidate, 'verdict' | 'reason' | 'model'>,
		itemIndex?: number,
	): Promise<Candidate> {
		try {
			const [estimate, status] = await Promise.all([
				this.request<EstimateResponse>(
					a.url,
					{
						method: 'POST',
						path: '/models/estimate',
						body: { model: id },
						timeoutMs: ESTIMATE_TIMEOUT_MS,
					},
					itemIndex,
				),
				this.request<StatusResponse>(
					a.url,
					{ method: 'GET', path: '/models/status', timeoutMs: PROBE_TIMEOUT_MS },
					itemIndex,
				),
			]);
			const verdict = verdictOf(estimate.fit);
			return {
				...base,
				model: id,
				verdict,
				reason: estimate.fit.reason,
				evict: estimate.fit.evict ?? [],
				freeMb: typeof status.free_mb === 'number' ? status.free_mb : null,
				code: verdict === 'refused' ? (estimate.fit.refusal ?? 'insufficient_vram') : null,
				estimate,
			};
		} catch (error) {
			const e = error as NodeApiError;
			// a node that did not answer is refused; one that answered the estimate with an error is a last resort,
			// where a load says what happens (the sidecar's own error, its logs, a callback)
			return {
				...base,
				model: id,
				verdict: this.isGone(a.url) ? 'refused' : 'unknown',
				reason: e.message,
				code: (e.context?.code as string) ?? null,
				error: e,
			};
		}
	}

	/** The node to send `model` to: the assessment's best candidate; an error saying why for each node when none fits. */
	async choose(
		model: string,
		itemIndex?: number,
		node?: string,
	): Promise<{ chosen: Candidate; assessment: Assessment }> {
		const assessment = await this.assess(model, itemIndex, node, false);
		const chosen = assessment.candidates.find((c) => c.verdict !== 'refused');
		if (chosen) return { chosen, assessment };
		throw this.refusal(assessment, itemIndex);
	}

	/** Why no node can take the model: each node's reason, and who did not answer. */
	refusal(assessment: Assessment, itemIndex?: number): NodeApiError {
		const { model, candidates, skipped } = assessment;
		const per = [
			...candidates.map((c) =>
				c.reason.startsWith(`${c.node}`) ? c.reason : `${c.node}: ${c.reason}`,
			),
			...skipped.map((s) => s.message),
		].join('; ');
		if (candidates.every((c) => c.code === 'model_not_found')) {
			return fleetError(
				this.ctx,
				'model_not_found',
				`unknown model '${model}': no sidecar has it in its registry (${per})`,
				'404',
				itemIndex,
			);
		}
		const code =
			candidates.find((c) => c.code && c.code !== 'model_not_found')?.code ?? 'insufficient_vram';
		return fleetError(this.ctx, code, `${model} fits on no node now (${per})`, '409', itemIndex);
	}
}
