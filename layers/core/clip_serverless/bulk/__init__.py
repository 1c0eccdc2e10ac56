"""Bulk embedding: a whole S3 prefix of images (or a file of captions) into index-ready shards.

A job embeds ``SRC`` into ``DST`` in three steps, each a Lambda invocation that Step Functions runs (the
state machine in ``template.yaml``) or that ``bulk_cli`` runs on this machine:

1. **plan** (:mod:`.plan`): list the source (``ListObjectsV2``, paginated, resumable from the last key it
   planned; or an S3 Inventory manifest, :mod:`.inventory`; or the rows of a captions file,
   :mod:`.captions`) into batches of N entries, one object per batch under ``DST/_plan/batches/``, and the
   list of batches, ``DST/_plan/plan.json``, which the Distributed Map reads with ``s3:getObject``. A
   planner invocation stops before its time is up and leaves a checkpoint; the state machine calls it
   again until the plan is complete.
2. **embed one shard per batch** (:mod:`.shard`): read each object, decode, embed with the same core as
   ``embed_image`` (or ``embed_text``), write the shard, then its done record.
3. **finish** (:mod:`.finish`): read every done record, check that they cover the plan and balance, and
   write ``DST/_manifest.json``.

Output (:mod:`.layout`), in clip-retrieval's embedding-folder layout (what autofaiss and clip-retrieval's
back end read)::

    DST/img_emb/img_emb_000000.npy          (n, D) float32 or float16, np.save, no pickle
    DST/metadata/metadata_000000.jsonl      n lines, row for row: key, image_path, size, etag, sha256
    DST/errors/errors_000000.jsonl          the batch's entries that are not in the shard, with a reason
    DST/_shards/000000.json                 the done record, written last
    DST/_manifest.json                      counts, model id, digest, precision

Every planned entry ends up in exactly one metadata row or one errors line. A re-run of a job skips each
shard whose done record matches the model and the output dtype: shard names come from the plan, which is
written once per destination, and every write is a whole-object PUT of the same bytes.

Only :mod:`.shard` imports numpy and the engine; the planner and the finisher run on the core layer alone.
"""
