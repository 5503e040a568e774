import { readFile } from 'node:fs/promises';

import { parse as parseYaml } from 'yaml';

import { configSchema, type Config } from './schema.ts';

/** A configuration problem a user must fix; the CLI exits with status 2 for it. */
export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** Reads, expands and validates a configuration file. Throws ConfigError naming the bad key. */
export async function loadConfig(path: string, env: NodeJS.ProcessEnv = process.env): Promise<Config> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    throw new ConfigError(`cannot read config file ${path}: ${(error as Error).message}`);
  }
  return parseConfig(text, path, env);
}

export function parseConfig(text: string, source: string, env: NodeJS.ProcessEnv = process.env): Config {
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (error) {
    throw new ConfigError(`${source}: invalid YAML: ${(error as Error).message}`);
  }
  const expanded = expandEnvironment(raw ?? {}, [], env);
  const result = configSchema.safeParse(expanded);
  if (!result.success) {
    const problems = result.error.issues.map((issue) => `  ${formatPath(issue.path)}: ${issue.message}`);
    throw new ConfigError(`${source}: invalid configuration:\n${problems.join('\n')}`);
  }
  return result.data;
}

function formatPath(path: PropertyKey[]): string {
  if (path.length === 0) return '(top level)';
  return path.map((part) => (typeof part === 'number' ? `[${part}]` : String(part))).join('.').replace(/\.\[/g, '[');
}

/**
 * Replaces `${VAR}` in every string value with the environment variable's value, after YAML
 * parsing so a value can never change the document's structure. `$${` is a literal `${`.
 */
function expandEnvironment(value: unknown, path: PropertyKey[], env: NodeJS.ProcessEnv): unknown {
  if (typeof value === 'string') return expandString(value, path, env);
  if (Array.isArray(value)) return value.map((item, index) => expandEnvironment(item, [...path, index], env));
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(
      Object.entries(value).map(([key, item]) => [key, expandEnvironment(item, [...path, key], env)]),
    );
  }
  return value;
}

function expandString(value: string, path: PropertyKey[], env: NodeJS.ProcessEnv): string {
  return value.replace(/\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (match, name: string | undefined) => {
    if (name === undefined) return '${';
    const replacement = env[name];
    if (replacement === undefined) {
      throw new ConfigError(`${formatPath(path)}: environment variable ${name} is not set`);
    }
    return replacement;
  });
}

const SECRET_KEYS = new Set(['password', 'secret']);
const DURATION_KEYS = /(_timeout|^clock_tolerance)$/;

/**
 * Returns the config as it can be printed and read back: every secret replaced by `****`
 * and durations written with their unit.
 */
export function printableConfig(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(printableConfig);
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(
      Object.entries(value).map(([key, item]) => {
        if (SECRET_KEYS.has(key) && item !== undefined) return [key, '****'];
        if (DURATION_KEYS.test(key) && typeof item === 'number') return [key, `${item}ms`];
        return [key, printableConfig(item)];
      }),
    );
  }
  return value;
}

