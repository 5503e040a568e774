import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // Unit tests sit next to their module in src/, and integration tests live in test/.
    include: ['src/**/*.test.ts', 'test/**/*.test.ts'],
    // Starts one PostgreSQL server for the whole run (test/global-setup.ts).
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    teardownTimeout: 30_000,
  },
});
