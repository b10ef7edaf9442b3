// The committed API types are what openapi-typescript generates from the committed openapi.json (no drift).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';

import { generate, TYPES } from '../scripts/generate-api-types.mjs';

test('nodes/shared/api-types.ts is generated from openapi.json (run `make openapi`)', async () => {
	const committed = await readFile(TYPES, 'utf8');
	assert.ok(
		committed === (await generate()),
		'api-types.ts differs from openapi.json: run `make openapi`',
	);
});
