#!/bin/bash
# Time the run list, comparison and export pages with 10,000 runs stored
# (docs/benchmarks.md). Uses a throw-away SQLite file, never the app's database:
# bench_pages refuses any database whose name lacks "bench".
#   scripts/bench-pages.sh                 # 10,000 runs, 5 requests per URL
#   scripts/bench-pages.sh --repeat 10     # extra arguments go to bench_pages
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${BENCH_DB:-/tmp/criuweb-bench.sqlite3}
case "$(basename "$DB")" in *bench*) ;; *) echo "BENCH_DB must name a file containing 'bench'" >&2; exit 2 ;; esac
rm -f "$DB"   # start from an empty database every time
export DATABASE_URL="sqlite:///$DB"
.venv/bin/python manage.py migrate -v0
.venv/bin/python manage.py bench_pages --runs 10000 "$@"
