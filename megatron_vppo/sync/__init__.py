"""Weight flow from the sharded trainer out (the data flow's last leg: data -> rollout -> reward ->
algo -> train -> sync), one module per job:

    plan.py         metadata pre-pass and conversion plan (ParamMeta, ExportGroup, ExportPlan)
    stream.py       the HF-layout weight stream (TP gather, pipeline-stage moves, buckets, drain)
    engine_push.py  feeding a rollout engine (push_to_engine, sync_engine_weights)
    hf_writer.py    writing a Hugging Face directory (save_hf_checkpoint, export_hf_checkpoint)

Import from the module that does the job; this package file imports nothing.
"""
