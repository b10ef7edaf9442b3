/**
 * The one "Model" parameter of every node and its one picker. Version 2 of Check VRAM, Load, Chat and the Chat
 * Model (and Unload from its version 1) use `modelLocator`: a resource locator, "From List" (every model of every
 * sidecar of the fleet, with where it is loaded) or "By Name" (any id or alias, or an expression). Workflows saved
 * with version 1 keep their plain-string parameter, shown by `modelOptionsV1` (same picker data). Either shape is
 * read with `modelParameter`.
 */
import type {
	IExecuteFunctions,
	ILoadOptionsFunctions,
	INodeListSearchResult,
	INodeProperties,
	INodePropertyOptions,
	ISupplyDataFunctions,
} from 'n8n-workflow';

import type { ModelsResponse } from './api';
import { Fleet } from './fleet';
import { modelName } from './transport';

type Shown = NonNullable<INodeProperties['displayOptions']>['show'];

/** Version 2 (Unload: 1): the resource locator. `show` adds the node's own display conditions. */
export function modelLocator(
	description: string,
	show: Shown = {},
	versions?: number[],
): INodeProperties {
	return {
		displayName: 'Model',
		name: 'model',
		type: 'resourceLocator',
		default: { mode: 'list', value: '' },
		required: true,
		description,
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
				placeholder: 'e.g. qwen3-vl-30b',
			},
		],
		...(versions || Object.keys(show ?? {}).length
			? { displayOptions: { show: { ...show, ...(versions ? { '@version': versions } : {}) } } }
			: {}),
	};
}

/** Version 1 of Check VRAM, Load, Chat and the Chat Model: the plain options field workflows were saved with. */
export function modelOptionsV1(description: string, show: Shown = {}): INodeProperties {
	return {
		displayName: 'Model Name or ID',
		name: 'model',
		type: 'options',
		typeOptions: { loadOptionsMethod: 'getModels' },
		default: '',
		required: true,
		description: `${description} Choose from the list, or specify an ID using an <a href="https://docs.n8n.io/code/expressions/">expression</a>`,
		displayOptions: { show: { ...show, '@version': [1] } },
	};
}

/** The model a node's parameter names, whichever version saved it (a resource locator or a plain string). */
export function modelParameter(
	this: IExecuteFunctions | ISupplyDataFunctions,
	itemIndex: number,
): string {
	return modelName(this.getNodeParameter('model', itemIndex, '', { extractValue: true }));
}

/** Every model of every sidecar that answered: "id (loaded on gpu-a; vision)". Pure: the tests call it. */
export function fleetModelOptions(
	answers: Array<{ node: string; body: ModelsResponse }>,
): INodePropertyOptions[] {
	const byId = new Map<
		string,
		{ loadedOn: string[]; on: string[]; vision: boolean; aliases: Set<string> }
	>();
	for (const { node, body } of answers) {
		for (const m of body.models ?? []) {
			const entry = byId.get(m.id) ?? {
				loadedOn: [],
				on: [],
				vision: false,
				aliases: new Set<string>(),
			};
			entry.on.push(node);
			if (m.status === 'loaded') entry.loadedOn.push(node);
			entry.vision ||= Boolean(m.vision);
			for (const a of m.aliases ?? []) entry.aliases.add(a);
			byId.set(m.id, entry);
		}
	}
	const several = answers.length > 1;
	return [...byId.entries()]
		.sort(([a], [b]) => a.localeCompare(b))
		.map(([id, e]) => {
			const tags = [
				e.loadedOn.length ? `loaded${several ? ` on ${e.loadedOn.join(', ')}` : ''}` : 'unloaded',
			];
			if (e.vision) tags.push('vision');
			const where = several ? `On ${e.on.join(', ')}.` : '';
			const aliases = e.aliases.size ? `Aliases: ${[...e.aliases].join(', ')}.` : '';
			return {
				name: `${id} (${tags.join(', ')})`,
				value: id,
				description: [where, aliases].filter(Boolean).join(' ') || undefined,
			};
		});
}

/** The picker's data: GET /models of every sidecar of the fleet. */
export async function getModels(this: ILoadOptionsFunctions): Promise<INodePropertyOptions[]> {
	const fleet = await Fleet.open(this);
	return fleetModelOptions(await fleet.survey<ModelsResponse>('/models'));
}

/** The picker ("From List"), filtered by what the user typed. */
export async function searchModels(
	this: ILoadOptionsFunctions,
	filter?: string,
): Promise<INodeListSearchResult> {
	const wanted = (filter ?? '').trim().toLowerCase();
	const options = await getModels.call(this);
	return {
		results: options
			.filter((o) => !wanted || o.name.toLowerCase().includes(wanted))
			.map((o) => ({ name: o.name, value: String(o.value), description: o.description })),
	};
}

/** Both pickers, as every node's `methods` lists them (loadOptions for version 1's field). */
export const modelPickers = {
	loadOptions: { getModels },
	listSearch: { searchModels },
};
