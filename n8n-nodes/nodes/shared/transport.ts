/**
 * One request to one sidecar (`callSidecar`: Bearer key through the credential's `authenticate`, JSON in and out),
 * and the sidecar's error body ({"error": {code, message, type}}) turned into a NodeApiError that carries the
 * sidecar's own message. Which sidecar a request goes to is fleet.ts's business.
 */
import type {
	IDataObject,
	IExecuteFunctions,
	IHttpRequestMethods,
	IHttpRequestOptions,
	ILoadOptionsFunctions,
	INode,
	ISupplyDataFunctions,
	JsonObject,
} from 'n8n-workflow';
import { NodeApiError, NodeOperationError } from 'n8n-workflow';

export const CREDENTIAL_NAME = 'modelOrchestratorApi';

export type SidecarContext = IExecuteFunctions | ILoadOptionsFunctions | ISupplyDataFunctions;

/** "http://host:8000/", "http://host:8000/v1" -> "http://host:8000". */
export function normaliseBaseUrl(url: unknown): string {
	let s = String(url ?? '').trim();
	if (!s) throw new Error('The Model Orchestrator credential has no base URL');
	if (!/^https?:\/\//i.test(s)) s = `http://${s}`;
	s = s.replace(/\/+$/, '');
	s = s.replace(/\/v1$/, '');
	return s;
}

export interface SidecarErrorInfo {
	/** HTTP status as a string ('404'), when there was a response */
	httpCode?: string;
	/** the sidecar's error.code ('model_not_found', 'load_timeout', ...) */
	code?: string;
	message: string;
	type?: string;
	/** the whole error body from the sidecar, when there was one */
	body?: IDataObject;
}

function asObject(v: unknown): IDataObject | undefined {
	if (typeof v === 'string') {
		try {
			v = JSON.parse(v);
		} catch {
			return undefined;
		}
	}
	return v && typeof v === 'object' && !Array.isArray(v) ? (v as IDataObject) : undefined;
}

/**
 * Dig the sidecar's error out of whatever the HTTP helper threw: an axios-style error (`response.status`,
 * `response.data`), an n8n wrapper around one (`cause`, `context`), or a bare Error (connection refused, timeout).
 */
export function extractSidecarError(error: unknown): SidecarErrorInfo {
	const seen = new Set<unknown>();
	const candidates: unknown[] = [error];
	let httpCode: string | undefined;
	let body: IDataObject | undefined;
	while (candidates.length) {
		const c = candidates.shift();
		if (!c || typeof c !== 'object' || seen.has(c)) continue;
		seen.add(c);
		const o = c as IDataObject;
		const response = asObject(o.response);
		const status =
			response?.status ?? response?.statusCode ?? o.httpCode ?? o.statusCode ?? o.status;
		if (
			!httpCode &&
			(typeof status === 'number' || (typeof status === 'string' && /^\d{3}$/.test(status)))
		) {
			httpCode = String(status);
		}
		for (const data of [response?.data, response?.body, o.error, o.errorResponse, o.body]) {
			const d = asObject(data);
			if (!body && d && asObject(d.error) && typeof asObject(d.error)?.message === 'string')
				body = d;
			else if (d) candidates.push(d);
		}
		for (const next of [o.cause, o.context, o.error]) candidates.push(next);
	}
	const detail = asObject(body?.error);
	if (detail) {
		return {
			httpCode,
			code: typeof detail.code === 'string' ? detail.code : undefined,
			type: typeof detail.type === 'string' ? detail.type : undefined,
			message: String(detail.message),
			body,
		};
	}
	const e = error as { message?: unknown; code?: unknown };
	const message = typeof e?.message === 'string' && e.message ? e.message : String(error);
	return { httpCode, code: typeof e?.code === 'string' ? e.code : undefined, message };
}

/** A NodeApiError whose message is the sidecar's message and whose description names its error code. */
export function toNodeApiError(node: INode, error: unknown, itemIndex?: number): NodeApiError {
	const info = extractSidecarError(error);
	const unreachable = [
		'ECONNREFUSED',
		'ENOTFOUND',
		'EAI_AGAIN',
		'ECONNRESET',
		'ETIMEDOUT',
	].includes(info.code ?? '');
	const description = [
		info.code ? `code: ${info.code}` : undefined,
		info.httpCode ? `HTTP ${info.httpCode}` : undefined,
		unreachable
			? `${info.message}. Check the Base URL of the Model Orchestrator credential.`
			: undefined,
	]
		.filter(Boolean)
		.join(', ');
	const payload: JsonObject = (info.body ?? {
		error: { message: info.message, code: info.code ?? null },
	}) as JsonObject;
	return new NodeApiError(node, payload, {
		message: info.message,
		description: description || undefined,
		httpCode: info.httpCode,
		itemIndex,
	});
}

/** An error as the node throws it: n8n's own errors unchanged, anything else as a NodeApiError. */
export function asNodeError(
	node: INode,
	error: unknown,
	itemIndex?: number,
): NodeApiError | NodeOperationError {
	if (error instanceof NodeApiError || error instanceof NodeOperationError) return error;
	return toNodeApiError(node, error, itemIndex);
}

export interface SidecarRequest {
	method: IHttpRequestMethods;
	path: string;
	body?: IDataObject;
	qs?: IDataObject;
	headers?: Record<string, string>;
	/** milliseconds; default 5 minutes */
	timeoutMs?: number;
	/** answer {body, headers, statusCode} instead of the body alone (to read the sidecar's response headers) */
	fullResponse?: boolean;
}

/** The request options for one call (kept pure so that the tests can check them). */
export function buildRequestOptions(baseUrl: string, req: SidecarRequest): IHttpRequestOptions {
	const options: IHttpRequestOptions = {
		method: req.method,
		url: `${normaliseBaseUrl(baseUrl)}${req.path}`,
		json: true,
		headers: { Accept: 'application/json', ...req.headers },
		timeout: req.timeoutMs ?? 300_000,
	};
	if (req.body !== undefined) options.body = req.body;
	if (req.qs !== undefined) options.qs = req.qs;
	if (req.fullResponse) options.returnFullResponse = true;
	return options;
}

/** One call to the sidecar at `baseUrl`, authenticated by the credential; errors come back as the helper threw them. */
export async function callSidecar(
	this: SidecarContext,
	baseUrl: string,
	req: SidecarRequest,
): Promise<unknown> {
	return await this.helpers.httpRequestWithAuthentication.call(
		this,
		CREDENTIAL_NAME,
		buildRequestOptions(baseUrl, req),
	);
}

/** A model parameter's name: a resource locator's value ({__rl, mode, value}) or a plain string (version 1). */
export function modelName(value: unknown): string {
	if (value && typeof value === 'object' && 'value' in value) {
		return String((value as { value: unknown }).value ?? '').trim();
	}
	return String(value ?? '').trim();
}
