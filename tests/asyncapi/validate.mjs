// Parse an AsyncAPI document with the official parser; print its diagnostics, exit 1 on errors.
// Usage: node validate.mjs document.json
import { readFileSync } from "node:fs";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const text = readFileSync(process.argv[2], "utf8");
const { document, diagnostics } = await new Parser().parse(text);
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
for (const d of diagnostics) {
  const where = d.path && d.path.length ? d.path.join(".") : "(document)";
  console.log(`${DiagnosticSeverity[d.severity]} ${d.code} at ${where}: ${d.message}`);
}
if (errors.length || !document) {
  process.exit(1);
}
const messages = document.allMessages().all().map((m) => m.name());
console.log(`valid AsyncAPI ${document.version()}: ${messages.length} messages: ${messages.join(" ")}`);
