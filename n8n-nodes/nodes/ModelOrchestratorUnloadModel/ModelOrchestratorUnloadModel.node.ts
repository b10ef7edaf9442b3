import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
} from 'n8n-workflow';
import { NodeConnectionTypes, NodeOperationError } from 'n8n-workflow';

import { readmeUrl } from '../shared/docs';
import type { UnloadRequest } from '../shared/api';
import { runPerItem, type ItemResult } from '../shared/execute';
import { modelName, searchModels, sidecarRequest } from '../shared/transport';

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
			{
				displayName: 'Model',
				name: 'model',
				type: 'resourceLocator',
				default: { mode: 'list', value: '' },
				required: true,
				description:
					"What to unload: a model of the sidecar's registry, or any name (another service's reservation, e.g. wan2.1-14b). A name that holds nothing answers result not_loaded / not_held, which is not an error.",
				modes: [
					{
						displayName: 'From List',
						name: 'list',
						type: 'list',
						typeOptions: { searchListMethod: 'searchModels', searchable: true },
					},
					{
						displayName: 'By Name',
						name: 'id',
						type: 'string',
						placeholder: 'e.g. qwen3-vl-30b or wan2.1-14b',
					},
				],
			},
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

	methods = {
		listSearch: { searchModels },
	};

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		return runPerItem.call(this, unloadItem);
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

async function unloadItem(this: IExecuteFunctions, i: number): Promise<ItemResult> {
	const model = this.getNodeParameter('model', i, '', { extractValue: true });
	const force = this.getNodeParameter('force', i, false) as boolean;
	const drain = force ? 0 : (this.getNodeParameter('drainTimeoutS', i, 30) as number);
	const body = buildUnloadBody(model, force, drain);
	if (!body.model) {
		throw new NodeOperationError(this.getNode(), 'Choose the model to unload', { itemIndex: i });
	}
	// every 200 is a result, including "not_loaded" (a registry model that is not loaded) and "not_held"
	// (a name with nothing under it): unloading is idempotent
	const response = await sidecarRequest.call(
		this,
		{
			method: 'POST',
			path: '/models/unload',
			body: body as IDataObject,
			timeoutMs: (drain + 60) * 1000,
		},
		i,
	);
	return { json: response };
}
