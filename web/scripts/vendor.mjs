// Copies the pinned front-end dependencies from node_modules into static/vendor, where the UI
// serves them from its own origin (never a CDN). Run after `npm ci`: `npm run vendor`.
import { copyFileSync, existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const target = join(web, "static", "vendor");

// [source in node_modules, name in static/vendor]. Keep in step with VENDOR_ASSETS in
// platform/carrara/ui/templating.py, which refuses to serve pages when one is missing.
const assets = [
  ["htmx.org/dist/htmx.min.js", "htmx.min.js"],
  ["htmx.org/LICENSE", "htmx.LICENSE.txt"],
  ["chart.js/dist/chart.umd.min.js", "chart.umd.min.js"],
  ["chart.js/LICENSE.md", "chart.js.LICENSE.md"],
  // The REST API's docs pages (/docs, /redoc) load these from here too: they work offline.
  ["swagger-ui-dist/swagger-ui-bundle.js", "swagger-ui-bundle.js"],
  ["swagger-ui-dist/swagger-ui.css", "swagger-ui.css"],
  ["swagger-ui-dist/LICENSE", "swagger-ui.LICENSE.txt"],
  ["redoc/bundles/redoc.standalone.js", "redoc.standalone.js"],
  ["redoc/LICENSE", "redoc.LICENSE.txt"],
];

mkdirSync(target, { recursive: true });
for (const [source, name] of assets) {
  const from = join(web, "node_modules", source);
  if (!existsSync(from)) {
    console.error(`vendor: ${from} is missing; run \`npm ci\` in web/ first`);
    process.exit(1);
  }
  copyFileSync(from, join(target, name));
}
console.log(`vendor: ${assets.map(([, name]) => name).join(", ")} -> web/static/vendor`);
