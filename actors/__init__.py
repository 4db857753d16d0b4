"""pipeline_cluster actors: root, log, node, stage supervisor and worker (pykka ThreadingActors)."""
