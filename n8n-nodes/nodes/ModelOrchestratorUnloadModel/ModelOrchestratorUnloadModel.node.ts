import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
} from 'n8n-workflow';
import { NodeConnectionTypes } from 'n8n-workflow';

import { asNodeError, extractSidecarError, getModels, sidecarRequest } from '../shared/transport';
import { readmeUrl } from '../shared/docs';

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
		subtitle: '={{$parameter["model"]}}',
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
				displayName: 'Model Name or ID',
				name: 'model',
				type: 'options',
				typeOptions: { loadOptionsMethod: 'getModels' },
				default: '',
				required: true,
				description:
					'The model to unload. Choose from the list, or specify an ID using an <a href="https://docs.n8n.io/code/expressions/">expression</a>.',
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
		loadOptions: { getModels },
	};

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		const items = this.getInputData();
		const returnData: INodeExecutionData[] = [];
		for (let i = 0; i < items.length; i++) {
			try {
				const model = this.getNodeParameter('model', i) as string;
				const force = this.getNodeParameter('force', i, false) as boolean;
				const body: IDataObject = { model, force };
				let drain = 0;
				if (!force) {
					drain = this.getNodeParameter('drainTimeoutS', i, 30) as number;
					body.drain_timeout_s = drain;
				}
				const response = await sidecarRequest.call(
					this,
					{ method: 'POST', path: '/models/unload', body, timeoutMs: (drain + 60) * 1000 },
					i,
				);
				returnData.push({ json: response, pairedItem: { item: i } });
			} catch (error) {
				if (this.continueOnFail()) {
					const info = extractSidecarError(error);
					returnData.push({
						json: { error: (error as Error).message, code: info.code ?? null },
						pairedItem: { item: i },
					});
					continue;
				}
				throw asNodeError(this.getNode(), error, i);
			}
		}
		return [returnData];
	}
}
