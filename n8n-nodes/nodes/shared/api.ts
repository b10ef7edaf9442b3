/**
 * The sidecar's request and response types, by name. They come from `api-types.ts`, which openapi-typescript
 * generates from the sidecar's OpenAPI document (`openapi.json` at the repository root, written by
 * `model-orchestrator openapi`); `make openapi` regenerates both. Never type a body by hand: name it here.
 */
import type { components } from './api-types';

type Schemas = components['schemas'];

export type StatusResponse = Schemas['StatusResponse'];
export type ModelsResponse = Schemas['ModelsResponse'];
export type ModelInfo = Schemas['ModelInfo'];
export type LoadRequest = Schemas['LoadRequest'];
export type LoadResponse = Schemas['LoadResponse'];
export type UnloadRequest = Schemas['UnloadRequest'];
export type UnloadResponse = Schemas['UnloadResponse'];
export type EstimateRequest = Schemas['EstimateRequest'];
export type EstimateResponse = Schemas['EstimateResponse'];
export type ChatCompletionRequest = Schemas['ChatCompletionRequest'];
export type ModelStatus = Schemas['ModelStatus'];
export type DownloadStatus = Schemas['DownloadStatus'];
