"""SSH bootstrap of remote nodes with paramiko (`pipeline-cluster deploy`, `pc.SSHCluster`).

config (cluster.toml), sshconfig (what ~/.ssh/config says for a host), hostkeys (strict / accept-new / insecure),
sshkeys (the keys offered, agent and passphrases), remote (connections, jump hosts, commands),
wheel (the package as a reproducible wheel), hostscript (the stdlib-only helper run on each host), bootstrap
(bringing nodes up and down, per-host results), channelsock (tunnel channels as sockets), cluster (SSHCluster),
hostops (stop / status / logs by pidfile), commands (the CLI), errors.
"""
