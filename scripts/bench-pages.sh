#!/bin/bash
# Time the run list, comparison and export pages with 10,000 runs stored
# (docs/benchmarks.md), on a throw-away database, never the app's own:
# bench_pages refuses any database whose name lacks "bench".
#   scripts/bench-pages.sh                    # SQLite: 10,000 runs, 5 requests per URL
#   scripts/bench-pages.sh --postgres         # the same on a throwaway PostgreSQL server
#   scripts/bench-pages.sh --repeat 10        # extra arguments go to bench_pages
#   scripts/bench-pages.sh --use-database-url # the database DATABASE_URL names (its name must contain "bench")
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
--postgres)
    shift
    # A fresh server and database (criuweb/throwaway_postgres.py), stopped
    # and removed when this script's second self ends.
    exec .venv/bin/python -m criuweb.throwaway_postgres --database criuweb_bench -- "$0" --use-database-url "$@"
    ;;
--use-database-url)
    shift
    : "${DATABASE_URL:?--use-database-url needs DATABASE_URL}"
    ;;
*)
    DB=${BENCH_DB:-/tmp/criuweb-bench.sqlite3}
    case "$(basename "$DB")" in *bench*) ;; *) echo "BENCH_DB must name a file containing 'bench'" >&2; exit 2 ;; esac
    rm -f "$DB"   # start from an empty database every time
    export DATABASE_URL="sqlite:///$DB"
    ;;
esac
.venv/bin/python manage.py migrate -v0
.venv/bin/python manage.py bench_pages --runs 10000 "$@"
