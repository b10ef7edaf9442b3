import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
} from 'n8n-workflow';
import { NodeConnectionTypes, NodeOperationError } from 'n8n-workflow';

import { readmeUrl } from '../shared/docs';
import type { ModelsResponse, UnloadRequest } from '../shared/api';
import { runPerItem, type ItemResult } from '../shared/execute';
import { Fleet } from '../shared/fleet';
import { modelLocator, modelPickers } from '../shared/model-field';
import { holds } from '../shared/placement';
import { modelName } from '../shared/transport';
import { findModel } from '../shared/vram';

export class ModelOrchestratorUnloadModel implements INodeType {
	description: INodeTypeDescription = {
		displayName: 'Model Orchestrator Unload Model',
		name: 'modelOrchestratorUnloadModel',
		icon: {
			light: 'file:../../icons/unloadModel.svg',
			dark: 'file:../../icons/unloadModel.dark.svg',
		},
		documentationUrl: readmeUrl('unload-model'),
		group: ['transform'],
		version: 1,
		subtitle: '={{$parameter["model"].value ?? $parameter["model"]}}',
		description: 'Unload a model through the model-orchestrator sidecar and free its GPU memory',
		defaults: {
			name: 'Unload Model',
		},
		usableAsTool: true,
		inputs: [NodeConnectionTypes.Main],
		outputs: [NodeConnectionTypes.Main],
		credentials: [{ name: 'modelOrchestratorApi', required: true }],
		properties: [
			modelLocator(
				"What to unload: a model of a sidecar's registry (on the node that holds it; on each, when several do), or any name (another service's reservation, e.g. wan2.1-14b, released on every node). A name that holds nothing answers result not_loaded / not_held, which is not an error.",
			),
			{
				displayName: 'Force',
				name: 'force',
				type: 'boolean',
				default: false,
				description:
					'Whether to stop the model at once; requests in flight end with an error. Off: wait for them (see Drain Timeout).',
			},
			{
				displayName: 'Drain Timeout (Seconds)',
				name: 'drainTimeoutS',
				type: 'number',
				default: 30,
				typeOptions: { minValue: 0, maxValue: 3600 },
				description:
					'Without Force: how long to wait for requests in flight; if they are still running the unload is refused (model_busy)',
				displayOptions: { show: { force: [false] } },
			},
		],
	};

	methods = modelPickers;

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		const fleet = await Fleet.open(this);
		return runPerItem.call(this, async function (i) {
			return await unloadItem.call(this, fleet, i);
		});
	}
}

/**
 * The POST /models/unload body. `model` is the resource locator's value; workflows saved before it was one hold a
 * plain string, which is taken as is.
 */
export function buildUnloadBody(
	model: unknown,
	force: boolean,
	drainTimeoutS: number,
): UnloadRequest {
	const name = modelName(model);
	const body: UnloadRequest = { model: name, force };
	if (!force) body.drain_timeout_s = drainTimeoutS;
	return body;
}

/**
 * Where to send the unload: the nodes whose registry has the model and where it is not unloaded (the holders);
 * none holding it: the first node that knows it (it answers not_loaded); no registry knows the name: every node
 * (each releases that service's reservations, or answers not_held).
 */
export function unloadTargets(
	answers: Array<{ url: string; body: ModelsResponse }>,
	name: string,
): { urls: string[]; holders: boolean } {
	const knowing = answers.filter((a) => findModel(a.body, name));
	const holders = knowing.filter((a) => holds(findModel(a.body, name)!.status));
	if (holders.length) return { urls: holders.map((a) => a.url), holders: true };
	return { urls: (knowing.length ? knowing.slice(0, 1) : answers).map((a) => a.url), holders: false };
}

const RESULT_ORDER = ['unloaded', 'cancelled_load', 'cancelled_download', 'joined', 'released', 'not_loaded', 'not_held'];

async function unloadItem(this: IExecuteFunctions, fleet: Fleet, i: number): Promise<ItemResult> {
	const model = this.getNodeParameter('model', i, '', { extractValue: true });
	const force = this.getNodeParameter('force', i, false) as boolean;
	const drain = force ? 0 : (this.getNodeParameter('drainTimeoutS', i, 30) as number);
	const body = buildUnloadBody(model, force, drain);
	if (!body.model) {
		throw new NodeOperationError(this.getNode(), 'Choose the model to unload', { itemIndex: i });
	}
	const { urls } = unloadTargets(await fleet.survey<ModelsResponse>('/models', i), body.model);
	// every 200 is a result, including "not_loaded" (a registry model that is not loaded) and "not_held"
	// (a name with nothing under it): unloading is idempotent
	const results = await Promise.all(
		urls.map(async (url) => {
			const answer = await fleet.request<IDataObject>(
				url,
				{ method: 'POST', path: '/models/unload', body: body as IDataObject, timeoutMs: (drain + 60) * 1000 },
				i,
			);
			return { ...answer, node: fleet.node(url) } as IDataObject;
		}),
	);
	// the most telling result first (a node that did unload or release, before one that held nothing)
	results.sort((a, b) => RESULT_ORDER.indexOf(String(a.result)) - RESULT_ORDER.indexOf(String(b.result)));
	const json: IDataObject = { ...results[0] };
	if (results.length > 1) json.nodes = results;
	return { json };
}
