import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
} from 'n8n-workflow';
import { NodeConnectionTypes } from 'n8n-workflow';

import type { StatusResponse } from '../shared/api';
import { runPerItem, type ItemResult } from '../shared/execute';
import { asNodeError } from '../shared/transport';
import { Fleet } from '../shared/fleet';
import { modelLocator, modelOptionsV1, modelParameter, modelPickers } from '../shared/model-field';
import { readmeUrl } from '../shared/docs';
import {
	decideForMbFleet,
	decideForModel,
	fleetStatus,
	type NodeAnswer,
	type VramDecision,
	type WhenEviction,
	type WhenNoGpu,
} from '../shared/vram';

const MODEL_DESCRIPTION = 'The model that must fit (on some node of the fleet).';

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
		version: [1, 2],
		defaultVersion: 2,
		subtitle:
			'={{$parameter["check"] === "none" ? "status" : $parameter["check"] === "requiredMb" ? $parameter["requiredMb"] + " MB free?" : "enough for " + ($parameter["model"].value ?? $parameter["model"]) + "?"}}',
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
			modelOptionsV1(MODEL_DESCRIPTION, { check: ['model'] }),
			modelLocator(MODEL_DESCRIPTION, { check: ['model'] }, [2]),
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

	methods = modelPickers;

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		const check = this.getNodeParameter('check', 0) as Check;
		const fleet = await Fleet.open(this);
		// an error never counts as "enough": with two outputs it goes to "Not Enough"
		return runPerItem.call(
			this,
			async function (i) {
				return await checkItem.call(this, fleet, i);
			},
			check === 'none' ? {} : { outputs: 2, errorOutput: 1 },
		);
	}
}

type Check = 'none' | 'requiredMb' | 'model';
const ENOUGH = 0;
const NOT_ENOUGH = 1;

async function checkItem(this: IExecuteFunctions, fleet: Fleet, i: number): Promise<ItemResult> {
	const check = this.getNodeParameter('check', 0) as Check;
	const answers = await fleet.survey<StatusResponse>('/models/status', i);
	let decision: VramDecision;
	if (check === 'requiredMb') {
		const requiredMb = this.getNodeParameter('requiredMb', i) as number;
		const whenNoGpu = this.getNodeParameter('whenNoGpu', i, 'enough') as WhenNoGpu;
		decision = decideForMbFleet(answers, requiredMb, whenNoGpu);
	} else if (check === 'model') {
		const whenEviction = this.getNodeParameter('whenEviction', i, 'notEnough') as WhenEviction;
		decision = await decideOnTheFleet.call(
			this,
			fleet,
			answers,
			modelParameter.call(this, i),
			whenEviction,
			i,
		);
	}
	const status = fleetStatus(answers, fleet.skipped as unknown as IDataObject[]);
	if (check === 'none') return { json: status };
	return {
		json: { ...status, vram_check: decision! },
		output: decision!.enough ? ENOUGH : NOT_ENOUGH,
	};
}

/**
 * "Enough for Model" over the fleet: enough when a node holds the model, or one's own fit verdict says it fits
 * (after evicting, as When Loading Would Evict says); `node` is that node (Load Model would pick the same one).
 */
async function decideOnTheFleet(
	this: IExecuteFunctions,
	fleet: Fleet,
	answers: Array<NodeAnswer<StatusResponse>>,
	model: string,
	whenEviction: WhenEviction,
	i: number,
): Promise<VramDecision> {
	const assessment = await fleet.assess(model, i);
	const nodes = assessment.candidates.map((c) => ({
		node: c.node,
		verdict: c.verdict,
		reason: c.reason,
	}));
	const best = assessment.candidates.find((c) => c.verdict === 'held' || c.estimate);
	if (!best) {
		// no verdict anywhere: the sidecar's own error to the estimate (an unreadable file, the Hub offline)
		const unknown = assessment.candidates.find((c) => c.verdict === 'unknown' && c.error);
		throw unknown ? asNodeError(this.getNode(), unknown.error, i) : fleet.refusal(assessment, i);
	}
	if (best.verdict === 'held') {
		const where = fleet.urls.length > 1 ? ` on ${best.node}` : '';
		const own = answers.find((a) => a.url === best.url)?.body;
		return {
			enough: true,
			gpu: own?.mode === 'gpu',
			free_mb: own?.free_mb ?? null,
			required_mb: 0,
			model: best.model,
			reason: `${model} is already ${best.state}${where}: it needs no more memory`,
			node: best.node,
			nodes,
		};
	}
	const decision = decideForModel(best.estimate!, best.freeMb, whenEviction);
	return { ...decision, node: best.node, nodes };
}
