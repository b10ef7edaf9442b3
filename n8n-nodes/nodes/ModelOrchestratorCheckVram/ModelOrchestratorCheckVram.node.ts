import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
} from 'n8n-workflow';
import { NodeConnectionTypes } from 'n8n-workflow';

import type {
	EstimateRequest,
	EstimateResponse,
	ModelsResponse,
	StatusResponse,
} from '../shared/api';
import { runPerItem, type ItemResult } from '../shared/execute';
import { asNodeError, getModels, sidecarRequest } from '../shared/transport';
import { readmeUrl } from '../shared/docs';
import {
	decideForMb,
	decideForModel,
	findModel,
	isModelLoaded,
	type VramDecision,
	type WhenEviction,
	type WhenNoGpu,
} from '../shared/vram';

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
							"Two outputs: whether the model can be loaded now, as the sidecar's admission decides (its estimate, margin, reservations, other processes, per-GPU placement, the model cap)",
					},
				],
			},
			{
				displayName: 'Required Free MB',
				name: 'requiredMb',
				type: 'number',
				default: 18000,
				typeOptions: { minValue: 0 },
				description:
					'Free GPU memory (all GPUs, MB, as NVML reports it: no margin, reservations or eviction counted) needed for the "Enough" output. For a model, "Enough for Model" asks the sidecar\'s own admission instead.',
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
				displayOptions: { show: { check: ['requiredMb'] } },
			},
			{
				displayName: 'When Loading Would Evict',
				name: 'whenEviction',
				type: 'options',
				default: 'notEnough',
				description:
					"The model fits only after idle models are unloaded (the output's vram_check.fit.evict names them)",
				options: [
					{
						name: 'Treat as Not Enough',
						value: 'notEnough',
						description:
							'The Not Enough branch frees memory itself (e.g. unloads vram_check.fit.evict)',
					},
					{
						name: 'Treat as Enough',
						value: 'enough',
						description: 'The load evicts those idle models by itself',
					},
				],
				displayOptions: { show: { check: ['model'] } },
			},
		],
	};

	methods = {
		loadOptions: { getModels },
	};

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		const check = this.getNodeParameter('check', 0) as Check;
		// an error never counts as "enough": with two outputs it goes to "Not Enough"
		return runPerItem.call(this, checkItem, check === 'none' ? {} : { outputs: 2, errorOutput: 1 });
	}
}

type Check = 'none' | 'requiredMb' | 'model';
const ENOUGH = 0;
const NOT_ENOUGH = 1;

async function checkItem(this: IExecuteFunctions, i: number): Promise<ItemResult> {
	const check = this.getNodeParameter('check', 0) as Check;
	const status = (await sidecarRequest.call(
		this,
		{ method: 'GET', path: '/models/status', timeoutMs: 30_000 },
		i,
	)) as unknown as StatusResponse;
	if (check === 'none') return { json: status as unknown as IDataObject };
	let decision: VramDecision;
	if (check === 'requiredMb') {
		const requiredMb = this.getNodeParameter('requiredMb', i) as number;
		const whenNoGpu = this.getNodeParameter('whenNoGpu', i, 'enough') as WhenNoGpu;
		decision = decideForMb(status, requiredMb, whenNoGpu);
	} else {
		const model = this.getNodeParameter('model', i) as string;
		const whenEviction = this.getNodeParameter('whenEviction', i, 'notEnough') as WhenEviction;
		const models = (await sidecarRequest.call(
			this,
			{ method: 'GET', path: '/models', timeoutMs: 30_000 },
			i,
		)) as unknown as ModelsResponse;
		if (isModelLoaded(models, model)) {
			decision = {
				enough: true,
				gpu: status.free_mb !== null,
				free_mb: status.free_mb,
				required_mb: 0,
				model: findModel(models, model)!.id,
				reason: `${model} is already loaded: it needs no more memory`,
			};
		} else {
			decision = decideForModel(
				await estimateModel.call(this, model, i),
				status.free_mb,
				whenEviction,
			);
		}
	}
	return {
		json: { ...(status as unknown as IDataObject), vram_check: decision },
		output: decision.enough ? ENOUGH : NOT_ENOUGH,
	};
}

/** The sidecar's estimate and fit verdict; a sidecar without POST /models/estimate gets a clear error. */
async function estimateModel(
	this: IExecuteFunctions,
	model: string,
	itemIndex: number,
): Promise<EstimateResponse> {
	const body: EstimateRequest = { model };
	let response: EstimateResponse;
	try {
		response = (await sidecarRequest.call(
			this,
			{ method: 'POST', path: '/models/estimate', body: body as IDataObject, timeoutMs: 60_000 },
			itemIndex,
		)) as unknown as EstimateResponse;
	} catch (error) {
		throw asNodeError(this.getNode(), error, itemIndex);
	}
	return response;
}
