import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
} from 'n8n-workflow';
import { NodeApiError, NodeConnectionTypes } from 'n8n-workflow';

import { decideEnough, isModelLoaded, type WhenNoGpu } from '../shared/vram';
import { asNodeError, extractSidecarError, getModels, sidecarRequest } from '../shared/transport';
import { readmeUrl } from '../shared/docs';

export class ModelOrchestratorCheckVram implements INodeType {
	description: INodeTypeDescription = {
		displayName: 'Model Orchestrator Check VRAM',
		name: 'modelOrchestratorCheckVram',
		icon: {
			light: 'file:../../icons/checkVram.svg',
			dark: 'file:../../icons/checkVram.dark.svg',
		},
		documentationUrl: readmeUrl('check-vram'),
		group: ['transform'],
		version: 1,
		subtitle:
			'={{$parameter["check"] === "none" ? "status" : $parameter["check"] === "requiredMb" ? $parameter["requiredMb"] + " MB free?" : "enough for " + $parameter["model"] + "?"}}',
		description:
			'Read GPU memory and loaded models from the model-orchestrator sidecar, and branch on free memory',
		defaults: {
			name: 'Check VRAM',
		},
		usableAsTool: true,
		inputs: [NodeConnectionTypes.Main],
		outputs: `={{$parameter["check"] === "none" ? ["main"] : [{"type": "main", "displayName": "Enough"}, {"type": "main", "displayName": "Not Enough"}]}}`,
		credentials: [{ name: 'modelOrchestratorApi', required: true }],
		properties: [
			{
				displayName: 'Check',
				name: 'check',
				type: 'options',
				noDataExpression: true,
				default: 'none',
				options: [
					{
						name: 'Status Only',
						value: 'none',
						description: 'Return the status; one output',
					},
					{
						name: 'Required Free MB',
						value: 'requiredMb',
						description: 'Two outputs: enough free GPU memory for a number of MB, or not',
					},
					{
						name: 'Enough for Model',
						value: 'model',
						description:
							'Two outputs: enough free GPU memory for a model (the sidecar estimates its size), or not',
					},
				],
			},
			{
				displayName: 'Required Free MB',
				name: 'requiredMb',
				type: 'number',
				default: 18000,
				typeOptions: { minValue: 0 },
				description: 'Free GPU memory (all GPUs, MB) needed for the "Enough" output',
				displayOptions: { show: { check: ['requiredMb'] } },
			},
			{
				displayName: 'Model Name or ID',
				name: 'model',
				type: 'options',
				typeOptions: { loadOptionsMethod: 'getModels' },
				default: '',
				required: true,
				description:
					'The model that must fit. Choose from the list, or specify an ID using an <a href="https://docs.n8n.io/code/expressions/">expression</a>.',
				displayOptions: { show: { check: ['model'] } },
			},
			{
				displayName: 'When There Is No GPU',
				name: 'whenNoGpu',
				type: 'options',
				default: 'enough',
				description:
					'In CPU mode the sidecar reports no memory figures (free_mb is null). The output item says so in vram_check.gpu = false.',
				options: [
					{ name: 'Treat as Enough', value: 'enough', description: 'Models run on the CPU; go on' },
					{ name: 'Treat as Not Enough', value: 'notEnough' },
				],
				displayOptions: { show: { check: ['requiredMb', 'model'] } },
			},
		],
	};

	methods = {
		loadOptions: { getModels },
	};

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		const items = this.getInputData();
		const check = this.getNodeParameter('check', 0) as 'none' | 'requiredMb' | 'model';
		const enough: INodeExecutionData[] = [];
		const notEnough: INodeExecutionData[] = [];

		for (let i = 0; i < items.length; i++) {
			try {
				const status = await sidecarRequest.call(
					this,
					{ method: 'GET', path: '/models/status', timeoutMs: 30_000 },
					i,
				);
				if (check === 'none') {
					enough.push({ json: status, pairedItem: { item: i } });
					continue;
				}
				const whenNoGpu = this.getNodeParameter('whenNoGpu', i, 'enough') as WhenNoGpu;
				let decision;
				if (check === 'requiredMb') {
					const requiredMb = this.getNodeParameter('requiredMb', i) as number;
					decision = decideEnough(status, requiredMb, whenNoGpu);
				} else {
					const model = this.getNodeParameter('model', i) as string;
					if (isModelLoaded(status, model)) {
						decision = decideEnough(status, 0, whenNoGpu, model, true);
					} else {
						const estimate = await estimateModel.call(this, model, i);
						decision = decideEnough(status, estimate.totalMb, whenNoGpu, model);
						decision.estimate = estimate.response;
					}
				}
				const out = { json: { ...status, vram_check: decision }, pairedItem: { item: i } };
				(decision.enough ? enough : notEnough).push(out);
			} catch (error) {
				if (this.continueOnFail()) {
					const info = extractSidecarError(error);
					// an error never counts as "enough": with two outputs it goes to "Not Enough"
					(check === 'none' ? enough : notEnough).push({
						json: { error: (error as Error).message, code: info.code ?? null },
						pairedItem: { item: i },
					});
					continue;
				}
				throw asNodeError(this.getNode(), error, i);
			}
		}
		return check === 'none' ? [enough] : [enough, notEnough];
	}
}

/**
 * MB the sidecar estimates for a model (its answer's `estimate.total_mb`, or a top-level `total_mb`), and the
 * whole answer; a sidecar without POST /models/estimate gets a clear error.
 */
async function estimateModel(
	this: IExecuteFunctions,
	model: string,
	itemIndex: number,
): Promise<{ totalMb: number; response: IDataObject }> {
	let response: IDataObject;
	try {
		response = await sidecarRequest.call(
			this,
			{ method: 'POST', path: '/models/estimate', body: { model }, timeoutMs: 60_000 },
			itemIndex,
		);
	} catch (error) {
		const info = extractSidecarError(error);
		if ((info.httpCode === '404' && info.code !== 'model_not_found') || info.httpCode === '405') {
			throw new NodeApiError(
				this.getNode(),
				{ error: { code: info.code ?? 'not_found', message: info.message } },
				{
					message:
						'The sidecar is too old for "Enough for Model": it has no POST /models/estimate. Update model-orchestrator, or use "Required Free MB".',
					httpCode: info.httpCode,
					itemIndex,
				},
			);
		}
		throw asNodeError(this.getNode(), error, itemIndex);
	}
	const nested = response.estimate as IDataObject | undefined;
	const total = Number(response.total_mb ?? nested?.total_mb);
	if (!Number.isFinite(total)) {
		throw new NodeApiError(this.getNode(), response as never, {
			message: "The sidecar's estimate has no total_mb",
			itemIndex,
		});
	}
	return { totalMb: Math.ceil(total), response };
}
