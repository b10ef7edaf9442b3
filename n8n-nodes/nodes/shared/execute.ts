/**
 * The one per-item execute loop of the action nodes (Check VRAM, Load, Chat, Unload): each input item is handed
 * to the node's own handler; its answer goes to the output the handler names, paired with its input item; an
 * error stops the node, or with "continue on fail" becomes an item `{error, code, node}` on the error output (node:
 * the sidecar's node the error came from, null for the fleet as a whole). A node's
 * `execute()` is `return runPerItem.call(this, handler, ...)`, as n8n's own nodes route to their operations.
 */
import type { IDataObject, IExecuteFunctions, INodeExecutionData } from 'n8n-workflow';

import { asNodeError, extractSidecarError } from './transport';

export interface ItemResult {
	json: IDataObject;
	/** which output the item goes to; default 0 */
	output?: number;
}

export type ItemHandler = (
	this: IExecuteFunctions,
	itemIndex: number,
	item: INodeExecutionData,
) => Promise<ItemResult>;

export interface RunOptions {
	/** how many outputs the node has; default 1 */
	outputs?: number;
	/** where an item that failed goes with "continue on fail"; default 0 */
	errorOutput?: number;
}

export async function runPerItem(
	this: IExecuteFunctions,
	handler: ItemHandler,
	{ outputs = 1, errorOutput = 0 }: RunOptions = {},
): Promise<INodeExecutionData[][]> {
	const items = this.getInputData();
	const out: INodeExecutionData[][] = Array.from({ length: outputs }, () => []);
	for (let i = 0; i < items.length; i++) {
		try {
			const result = await handler.call(this, i, items[i]);
			out[result.output ?? 0].push({ json: result.json, pairedItem: { item: i } });
		} catch (error) {
			if (!this.continueOnFail()) throw asNodeError(this.getNode(), error, i);
			const info = extractSidecarError(error);
			const context = (error as { context?: IDataObject }).context ?? {};
			out[errorOutput].push({
				json: {
					error: (error as Error).message,
					code: (context.code as string) ?? info.code ?? null,
					node: (context.node as string) ?? null,
				},
				pairedItem: { item: i },
			});
		}
	}
	return out;
}
