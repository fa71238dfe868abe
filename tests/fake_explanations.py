"""A hand-built Explanations-like object for the metric and evaluate tests."""
from types import SimpleNamespace

import numpy as np


def explanations(success, n_edits, query_region, ref_split_index, ref_region, region_size=1, phi=None, grid=(4, 4)):
    """The fields the metrics read, (Q, T) edit slots with unused slots -1; query i is query_split_index i."""
    q, t = np.asarray(ref_split_index).shape
    return SimpleNamespace(
        success=np.asarray(success, bool), n_edits=np.asarray(n_edits, np.int32),
        query_region=np.asarray(query_region, np.int32).reshape(q, t, 2),
        ref_split_index=np.asarray(ref_split_index, np.int64),
        ref_region=np.asarray(ref_region, np.int32).reshape(q, t, 2),
        region_size=region_size, true=np.zeros(q, np.int64), pred=np.ones(q, np.int64),
        query_split_index=np.arange(q, dtype=np.int64),
        query_phi=np.zeros((q, *grid), np.float32) if phi is None else phi)


def write_run(directory, config, table, arrays, shards, *, summary=True, queries=None):
    """Store result rows the way the pipeline does: a ShardWriter shard per ``(start, stop)`` of ``shards``
    (rows of ``table`` / ``arrays``), then, with ``summary``, ``summary.json`` (written only by a finished run)
    saying ``queries`` (default: the rows written) were explained.

    Leaving a row range out, or ``summary=False``, gives the directory a killed run leaves.
    """
    import json

    from fgvce_jax import store

    writer = store.ShardWriter(directory, config)
    for index, (start, stop) in enumerate(shards):
        writer.write_shard(index, start, stop, table.slice(start, stop - start),
                           {k: v[start:stop] for k, v in arrays.items()})
    if summary:
        queries = sum(stop - start for start, stop in shards) if queries is None else queries
        (writer.dir / "summary.json").write_text(json.dumps({"method": config.get("method"), "queries": queries,
                                                             "seconds_per_query": 0.5}))
    return writer.dir


def id_table(e, query_ids, ref_ids):
    """The Parquet columns that name the images, as the pipeline writes them: ``query_split_index``, ``query_id``
    (``query_ids[query_split_index]``) and per query the ``edit_ref_id`` list (``ref_ids[ref_split_index]`` of its edits)."""
    import pyarrow as pa

    query_ids, ref_ids = np.asarray(query_ids, str), np.asarray(ref_ids, str)
    edits = [[str(ref_ids[r]) for r in e.ref_split_index[q, :k]] for q, k in enumerate(np.asarray(e.n_edits))]
    return pa.table({"query_split_index": e.query_split_index, "query_id": query_ids[e.query_split_index].tolist(),
                     "edit_ref_id": pa.array(edits, pa.list_(pa.string()))})
