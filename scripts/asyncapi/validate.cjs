// Validates AsyncAPI documents with the official parser (@asyncapi/parser, pinned in
// package.json / package-lock.json beside this file; scripts/install-validators.sh installs it).
//
//   node validate.cjs --modules DIR/node_modules docs/asyncapi.yaml ...
//
// The parser checks the document against the AsyncAPI JSON Schema of its version (bindings
// included), resolves every $ref (relative files too: the payloads point at the checked-in
// JSON Schemas) and runs its built-in Spectral rules. Errors and warnings fail; the output is
// one line per finding and a summary line per document. Exit code 1 on any finding.
"use strict";

const { createRequire } = require("node:module");
const path = require("node:path");

function parseArgs(argv) {
  const files = [];
  let modules = null;
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === "--modules") {
      modules = argv[++i];
    } else {
      files.push(argv[i]);
    }
  }
  if (!modules || files.length === 0) {
    process.stderr.write("usage: node validate.cjs --modules DIR/node_modules FILE...\n");
    process.exit(2);
  }
  return { modules: path.resolve(modules), files };
}

// Spectral's severities: 0 error, 1 warning, 2 info, 3 hint. Info and hints are advice.
const SEVERITY = ["error", "warning", "info", "hint"];
const FAILING = 1;

async function main() {
  const { modules, files } = parseArgs(process.argv.slice(2));
  const load = createRequire(path.join(modules, "package.json"));
  const { Parser, fromFile } = load("@asyncapi/parser");
  const parser = new Parser();
  let failed = 0;
  for (const file of files) {
    const { document, diagnostics } = await fromFile(parser, path.resolve(file)).parse();
    const findings = diagnostics.filter((d) => d.severity <= FAILING);
    for (const d of diagnostics) {
      const where = d.path && d.path.length ? d.path.join(".") : "(document)";
      const line = d.range ? `:${d.range.start.line + 1}` : "";
      process.stdout.write(`${file}${line}: ${SEVERITY[d.severity]} ${d.code}: ${d.message} at ${where}\n`);
    }
    if (document === undefined || findings.length > 0) {
      failed += 1;
      process.stdout.write(`${file}: INVALID (${findings.length} errors or warnings)\n`);
      continue;
    }
    const version = document.version();
    const channels = document.channels().length;
    const operations = document.operations().length;
    const messages = document.allMessages().length;
    process.stdout.write(
      `${file}: valid AsyncAPI ${version}: ${channels} channels, ${operations} operations, ` +
        `${messages} messages\n`,
    );
  }
  process.exit(failed ? 1 : 0);
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(2);
});
