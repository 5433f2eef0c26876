"""fgs_service: the HTTP API and the `fgs` command."""

import fgs_common.rq_adapter  # noqa: F401  (first: it sets RQ's key prefix before rq is imported)
