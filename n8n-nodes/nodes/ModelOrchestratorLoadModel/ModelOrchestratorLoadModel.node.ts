import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
	JsonObject,
} from 'n8n-workflow';
import { NodeApiError, NodeConnectionTypes, sleep } from 'n8n-workflow';

import type {
	DownloadStatus,
	LoadRequest,
	LoadResponse,
	ModelsResponse,
	ModelStatus,
	StatusResponse,
} from '../shared/api';
import { runPerItem, type ItemResult } from '../shared/execute';
import { Fleet } from '../shared/fleet';
import { modelLocator, modelOptionsV1, modelParameter, modelPickers } from '../shared/model-field';
import { placementReason, type Candidate } from '../shared/placement';
import { asNodeError, extractSidecarError, type SidecarRequest } from '../shared/transport';
import { readmeUrl } from '../shared/docs';

const MODEL_DESCRIPTION =
	"The model to load (each sidecar's GET /models). It goes to the node that holds it, else to a node where it fits now, else to one where it fits after evicting idle models (each sidecar's own verdict).";

interface LoadOptions {
	/** load on this node (its name); empty: the node placement picks */
	node?: string;
	priority?: number;
	allowEviction?: boolean;
	service?: string;
	callbackUrl?: string;
	/** Wait Until Ready: fail when a download brings no new bytes for this long (0: never) */
	stallTimeoutS?: number;
	/** Wait Until Ready: how often GET /models/status is asked */
	pollIntervalS?: number;
}

/** How often "Wait Until Ready" asks GET /models/status, unless the Poll Interval option says otherwise. */
export const POLL_INTERVAL_S = 1;
/** "Download Stall Timeout (Seconds)" by default: a download with no new bytes for this long fails the node. */
export const STALL_TIMEOUT_S = 300;
/** On top of Timeout (which the sidecar enforces as timeout_s): when the node gives up on a load itself. */
export const LOAD_MARGIN_S = 30;
/** Poll requests that may fail in a row (connection reset, 5xx) before the node gives up. */
export const MAX_POLL_FAILURES = 5;
/** One GET /models/status (or /models) request. */
const POLL_REQUEST_TIMEOUT_MS = 15_000;

/** What a download took, in the node's output (`download`): from the last status sample of the download. */
export interface DownloadSummary {
	bytes_total: number | null;
	seconds: number;
	bytes_per_second: number;
	files: Array<{ file: string; bytes_total: number | null; resumed_from: number }>;
	/** bytes an earlier, interrupted download had left (not fetched again), all files together */
	resumed_from: number;
}

/** The node's output with Wait Until Ready: today's LoadResponse fields, and `download` when one happened. */
export type LoadOutput = Omit<LoadResponse, 'download' | 'reservation'> & {
	download?: DownloadSummary;
};

/** One sidecar's requests: the chosen node's. */
type Ask = <T = IDataObject>(req: SidecarRequest) => Promise<T>;

/** The POST /models/load body (exported for the tests). allow_eviction is sent only when asked for. */
export function buildLoadBody(
	model: string,
	wait: boolean,
	timeoutS: number,
	options: LoadOptions,
): LoadRequest {
	const body: LoadRequest = { model, service: options.service || 'llama-cpp', wait };
	if (timeoutS > 0) body.timeout_s = timeoutS;
	if (options.priority !== undefined && options.priority >= 0) body.priority = options.priority;
	if (options.allowEviction) body.allow_eviction = true;
	if (!wait && options.callbackUrl) body.callback_url = options.callbackUrl;
	return body;
}

export class ModelOrchestratorLoadModel implements INodeType {
	description: INodeTypeDescription = {
		displayName: 'Model Orchestrator Load Model',
		name: 'modelOrchestratorLoadModel',
		icon: {
			light: 'file:../../icons/loadModel.svg',
			dark: 'file:../../icons/loadModel.dark.svg',
		},
		documentationUrl: readmeUrl('load-model'),
		group: ['transform'],
		version: [1, 2],
		defaultVersion: 2,
		subtitle: '={{$parameter["model"].value ?? $parameter["model"]}}',
		description:
			'Load a model into llama.cpp through the model-orchestrator sidecar (downloading its files first when missing) and wait until it is ready',
		defaults: {
			name: 'Load Model',
		},
		usableAsTool: true,
		inputs: [NodeConnectionTypes.Main],
		outputs: [NodeConnectionTypes.Main],
		credentials: [{ name: 'modelOrchestratorApi', required: true }],
		properties: [
			modelOptionsV1(MODEL_DESCRIPTION),
			modelLocator(MODEL_DESCRIPTION, {}, [2]),
			{
				displayName: 'Wait Until Ready',
				name: 'wait',
				type: 'boolean',
				default: true,
				description:
					'Whether to output only once the model is ready. The node starts the load and follows it by polling the sidecar every second (short requests, no long-held connection), through a first-load download of missing files too: the output then has a download summary. Off: one request; the sidecar starts the load (or download) and answers at once.',
			},
			{
				displayName: 'Timeout (Seconds)',
				name: 'timeoutS',
				type: 'number',
				default: 600,
				typeOptions: { minValue: 1, maxValue: 3600 },
				description:
					"How long llama-server may take to start before the load fails with load_timeout. A download before it is not counted: it may take as long as it keeps bringing bytes (see the Download Stall Timeout option).",
			},
			{
				displayName: 'Options',
				name: 'options',
				type: 'collection',
				placeholder: 'Add Option',
				default: {},
				options: [
					{
						displayName: 'Allow Eviction',
						name: 'allowEviction',
						type: 'boolean',
						default: false,
						description:
							'Whether the sidecar may unload lower-priority models to make room for this one',
					},
					{
						displayName: 'Callback URL',
						name: 'callbackUrl',
						type: 'string',
						default: '',
						placeholder: '={{ $execution.resumeUrl }}',
						description:
							'With Wait Until Ready off: the sidecar POSTs the load\'s outcome here when it ends (loaded or failed). Use {{ $execution.resumeUrl }} with a Wait node set to "On Webhook Call". The host must be in the sidecar\'s MODEL_ORCHESTRATOR_CALLBACK_HOSTS.',
					},
					{
						displayName: 'Download Stall Timeout (Seconds)',
						name: 'stallTimeoutS',
						type: 'number',
						default: STALL_TIMEOUT_S,
						typeOptions: { minValue: 0 },
						description:
							'With Wait Until Ready: fail when a download of the model\'s files brings no new bytes for this long (0: never). A download that keeps moving has no time limit.',
					},
					{
						displayName: 'Node',
						name: 'node',
						type: 'string',
						default: '',
						placeholder: 'e.g. gpu-node-2',
						description:
							"Load it on this node (its name, as the outputs' node field shows it), also when another node holds it already. Empty: the node that holds it, else where it fits.",
					},
					{
						displayName: 'Poll Interval (Seconds)',
						name: 'pollIntervalS',
						type: 'number',
						default: POLL_INTERVAL_S,
						typeOptions: { minValue: 0.1, numberPrecision: 1 },
						description:
							'With Wait Until Ready: how often the node asks the sidecar (GET /models/status) how the download and load stand',
					},
					{
						displayName: 'Priority',
						name: 'priority',
						type: 'number',
						default: 10,
						typeOptions: { minValue: 0, maxValue: 100 },
						description:
							"Priority while loaded (0-100), overriding the registry's; higher-priority models are evicted last",
					},
					{
						displayName: 'Service',
						name: 'service',
						type: 'string',
						default: 'llama-cpp',
						description: 'The service that runs the model',
					},
				],
			},
		],
	};

	methods = modelPickers;

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		const fleet = await Fleet.open(this);
		return runPerItem.call(this, async function (i) {
			return await loadItem.call(this, fleet, i);
		});
	}
}

/** A refusal that another node may not have: the room was taken since the node answered its estimate. */
const TRY_NEXT = ['insufficient_vram', 'too_many_models'];

async function loadItem(this: IExecuteFunctions, fleet: Fleet, i: number): Promise<ItemResult> {
	const model = modelParameter.call(this, i);
	const wait = this.getNodeParameter('wait', i, true) as boolean;
	const timeoutS = this.getNodeParameter('timeoutS', i, 600) as number;
	const options = this.getNodeParameter('options', i, {}) as LoadOptions;
	// always wait=false: with Wait Until Ready the node follows the load by polling instead of holding the request
	// (and sends no callback_url then: the node itself sees the outcome)
	const body: LoadRequest = { ...buildLoadBody(model, wait, timeoutS, options), wait: false };
	const { assessment } = await fleet.choose(model, i, options.node?.trim() || undefined);
	let last: unknown;
	for (const chosen of assessment.candidates.filter((c) => c.verdict !== 'refused')) {
		const ask: Ask = async (req) => await fleet.request(chosen.url, req, i);
		let first: LoadResponse;
		try {
			first = await postLoad.call(this, ask, body, i);
		} catch (error) {
			const code = (error as NodeApiError).context?.code as string | undefined;
			if (!fleet.isGone(chosen.url) && !TRY_NEXT.includes(code ?? '')) throw asNodeError(this.getNode(), error, i);
			last = error; // gone, or its room was taken meanwhile: the next candidate
			continue;
		}
		const where = placed(fleet, chosen);
		if (!wait) return { json: { ...(first as IDataObject), ...where } };
		const out = await followLoad.call(this, fleet.node(chosen.url), ask, first, body, timeoutS, options, i);
		return { json: { ...(out as IDataObject), ...where } };
	}
	throw last ?? fleet.refusal(assessment, i);
}

/** The output's `node` (where the model is now) and `placement` (why there). */
function placed(fleet: Fleet, chosen: Candidate): IDataObject {
	return { node: fleet.node(chosen.url), placement: placementReason(chosen) };
}

/** POST /models/load (wait=false: answers as soon as the load or its download began). */
async function postLoad(
	this: IExecuteFunctions,
	ask: Ask,
	body: LoadRequest,
	i: number,
): Promise<LoadResponse> {
	try {
		return await ask<LoadResponse>({
			method: 'POST',
			path: '/models/load',
			body: body as IDataObject,
			timeoutMs: 60_000,
		});
	} catch (error) {
		const info = extractSidecarError(error);
		if (body.allow_eviction && info.httpCode === '400' && /allow_eviction/.test(info.message)) {
			throw new NodeApiError(this.getNode(), (info.body ?? {}) as never, {
				message:
					'This sidecar does not support "Allow Eviction" yet (it rejected allow_eviction): update model-orchestrator or switch the option off',
				description: info.message,
				httpCode: info.httpCode,
				itemIndex: i,
			});
		}
		throw asNodeError(this.getNode(), error, i);
	}
}

/** What the output takes from the final status entry (or the POST's answer). */
type ProcessFields = Partial<Pick<ModelStatus, 'load_seconds' | 'pid' | 'port' | 'gpu' | 'estimate_mb'>>;

/** An error of the load on `node`, in the style of the sidecar's: "node: message", `code: <code>, node: <node>`. */
function loadError(
	this: IExecuteFunctions,
	i: number,
	node: string,
	code: string,
	message: string,
	extra: IDataObject = {},
): NodeApiError {
	const e = new NodeApiError(
		this.getNode(),
		{ error: { code, message, ...extra } } as JsonObject,
		{ message: `${node}: ${message}`, description: `code: ${code}, node: ${node}`, itemIndex: i },
	);
	e.context = { ...e.context, node, code };
	return e;
}

/** The download summary of the output, from the last status sample of the download. */
export function summariseDownload(d: DownloadStatus): DownloadSummary {
	const files = (d.files ?? []).map((f) => ({
		file: f.file,
		bytes_total: f.bytes_total,
		resumed_from: f.resumed_from ?? 0,
	}));
	return {
		bytes_total: d.bytes_total,
		seconds: d.seconds,
		bytes_per_second: d.bytes_per_second,
		files,
		resumed_from: files.reduce((sum, f) => sum + f.resumed_from, 0),
	};
}

/**
 * Wait Until Ready: follow the load that `first` (the POST's 202) started or joined by polling GET /models/status
 * until the model is `loaded` (the output), `failed` (its error), or gone (an unload cancelled it). Each request is
 * short, so no HTTP timeout limits a long download; instead a download fails when it stalls (no new bytes for
 * stallTimeoutS), and llama-server's start when it takes longer than timeout_s (the sidecar's limit) + a margin.
 */
async function followLoad(
	this: IExecuteFunctions,
	node: string,
	ask: Ask,
	first: LoadResponse,
	body: LoadRequest,
	timeoutS: number,
	options: LoadOptions,
	i: number,
): Promise<LoadOutput> {
	const already = first.result === 'already_loaded';
	const output = (entry: ProcessFields, download?: DownloadStatus | null) => {
		const out: LoadOutput = {
			model: first.model,
			status: 'loaded',
			result: already ? 'already_loaded' : 'loaded',
			load_seconds: entry.load_seconds ?? null,
			pid: entry.pid ?? null,
			port: entry.port ?? null,
			gpu: entry.gpu ?? null,
			estimate_mb: entry.estimate_mb ?? null,
			evicted,
		};
		if (download) out.download = summariseDownload(download);
		return out;
	};
	let evicted = first.evicted ?? [];
	if (first.status === 'loaded') return output(first);
	if (first.status !== 'downloading' && first.status !== 'loading') {
		return first as LoadOutput; // e.g. reserved: nothing to follow
	}

	const pollMs = Math.max(10, (options.pollIntervalS ?? POLL_INTERVAL_S) * 1000);
	const stallS = options.stallTimeoutS ?? STALL_TIMEOUT_S;
	const loadLimitS = timeoutS + LOAD_MARGIN_S;
	const id = first.model;

	let phase: string = first.status;
	let download: DownloadStatus | null = first.download ?? null;
	let bytesDone = download?.bytes_done ?? 0;
	let progressAt = Date.now();
	let loadingSince = phase === 'loading' ? Date.now() : 0;
	let failures = 0;
	let reposted = false;

	const cancelled = () =>
		loadError.call(
			this,
			i,
			node,
			'load_cancelled',
			`The load of ${id} was cancelled (an unload stopped it)`,
		);

	for (;;) {
		await sleep(pollMs);
		let status: StatusResponse;
		try {
			status = await ask<StatusResponse>({
				method: 'GET',
				path: '/models/status',
				timeoutMs: POLL_REQUEST_TIMEOUT_MS,
			});
			failures = 0;
		} catch (error) {
			const info = extractSidecarError(error);
			// a wrong key or a gone route will not heal; a reset connection or a busy sidecar may
			if (/^4/.test(info.httpCode ?? '') || ++failures > MAX_POLL_FAILURES) {
				throw asNodeError(this.getNode(), error, i);
			}
			continue;
		}
		const now = Date.now();
		const entry = status.loaded_models?.[id];
		const state = entry?.status ?? 'unloaded';

		if (state === 'unloaded') {
			if (phase === 'downloading' && !reposted) {
				// The download ended: with the files there the load follows it (the model is `unloaded` until its
				// admission); without them an unload stopped it. Asking again joins that load, or says why not.
				const models = await ask<ModelsResponse>({
					method: 'GET',
					path: '/models',
					timeoutMs: POLL_REQUEST_TIMEOUT_MS,
				});
				const info = models.models?.find((m) => m.id === id);
				if (info?.files_present) {
					reposted = true;
					const again = await postLoad.call(this, ask, body, i);
					if (again.evicted?.length) evicted = [...evicted, ...again.evicted];
					if (again.status === 'loaded') return output(again, download);
					phase = again.status;
					if (phase === 'loading') loadingSince = now;
					continue;
				}
			}
			throw cancelled();
		}
		if (state === 'unloading') throw cancelled();
		if (state === 'failed') {
			const err = (entry?.error ?? {}) as IDataObject;
			const code = typeof err.code === 'string' ? err.code : 'load_failed';
			const message =
				typeof err.message === 'string' && err.message
					? err.message
					: `${id} failed to ${phase === 'downloading' ? 'download' : 'load'}`;
			throw loadError.call(this, i, node, code, message, err);
		}
		if (state === 'loaded') return output(entry as ModelStatus, download);
		if (state === 'downloading') {
			phase = 'downloading';
			if (entry?.download) {
				if (entry.download.bytes_done > bytesDone || !download) progressAt = now;
				bytesDone = Math.max(bytesDone, entry.download.bytes_done);
				download = entry.download;
			}
			if (stallS > 0 && now - progressAt > stallS * 1000) {
				throw loadError.call(
					this,
					i,
					node,
					'download_stalled',
					`The download of ${id} stalled: no new bytes for ${stallS} s (${bytesDone} of ${
						download?.bytes_total ?? '?'
					} bytes). It may still go on in the sidecar; unload the model to stop it, or raise the Download Stall Timeout option.`,
				);
			}
		} else if (state === 'loading') {
			if (phase !== 'loading') {
				phase = 'loading';
				loadingSince = now;
			}
			if (now - loadingSince > loadLimitS * 1000) {
				throw loadError.call(
					this,
					i,
					node,
					'load_timeout',
					`${id} was not ready ${loadLimitS} s after its start (Timeout ${timeoutS} s plus a ${LOAD_MARGIN_S} s margin)`,
				);
			}
		}
	}
}
