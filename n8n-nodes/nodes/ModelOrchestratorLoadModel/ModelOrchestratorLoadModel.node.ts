import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
} from 'n8n-workflow';
import { NodeApiError, NodeConnectionTypes } from 'n8n-workflow';

import type { LoadRequest } from '../shared/api';
import { runPerItem, type ItemResult } from '../shared/execute';
import { asNodeError, extractSidecarError, getModels, sidecarRequest } from '../shared/transport';
import { readmeUrl } from '../shared/docs';

interface LoadOptions {
	priority?: number;
	allowEviction?: boolean;
	service?: string;
	callbackUrl?: string;
}

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
		version: 1,
		subtitle: '={{$parameter["model"]}}',
		description:
			'Load a model into llama.cpp through the model-orchestrator sidecar and wait until it is ready',
		defaults: {
			name: 'Load Model',
		},
		usableAsTool: true,
		inputs: [NodeConnectionTypes.Main],
		outputs: [NodeConnectionTypes.Main],
		credentials: [{ name: 'modelOrchestratorApi', required: true }],
		properties: [
			{
				displayName: 'Model Name or ID',
				name: 'model',
				type: 'options',
				typeOptions: { loadOptionsMethod: 'getModels' },
				default: '',
				required: true,
				description:
					'The model to load (the sidecar\'s GET /models). Choose from the list, or specify an ID using an <a href="https://docs.n8n.io/code/expressions/">expression</a>.',
			},
			{
				displayName: 'Wait Until Ready',
				name: 'wait',
				type: 'boolean',
				default: true,
				description:
					'Whether to answer only when llama-server is ready; off: the sidecar starts the load and answers at once',
			},
			{
				displayName: 'Timeout (Seconds)',
				name: 'timeoutS',
				type: 'number',
				default: 600,
				typeOptions: { minValue: 1, maxValue: 3600 },
				description:
					'How long the model may take to become ready before the load fails with load_timeout',
			},
			{
				displayName: 'Options',
				name: 'options',
				type: 'collection',
				placeholder: 'Add Option',
				default: {},
				options: [
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
						displayName: 'Allow Eviction',
						name: 'allowEviction',
						type: 'boolean',
						default: false,
						description:
							'Whether the sidecar may unload lower-priority models to make room for this one',
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

	methods = {
		loadOptions: { getModels },
	};

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		return runPerItem.call(this, loadItem);
	}
}

async function loadItem(this: IExecuteFunctions, i: number): Promise<ItemResult> {
	const model = this.getNodeParameter('model', i) as string;
	const wait = this.getNodeParameter('wait', i, true) as boolean;
	const timeoutS = this.getNodeParameter('timeoutS', i, 600) as number;
	const options = this.getNodeParameter('options', i, {}) as LoadOptions;
	const body = buildLoadBody(model, wait, timeoutS, options);
	try {
		const response = await sidecarRequest.call(
			this,
			{
				method: 'POST',
				path: '/models/load',
				body: body as IDataObject,
				// the sidecar answers when ready (or with load_timeout): give it that long and a margin
				timeoutMs: wait ? (timeoutS + 30) * 1000 : 60_000,
			},
			i,
		);
		return { json: response };
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
