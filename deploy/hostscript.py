"""The helper a deployment runs on each host as `python -c LOADER COMMAND ARGS...`, its source sent on stdin.

The loader reads exactly this source from stdin; what follows it (one JSON line) is the command's private input
(an install's environment), which never appears on a command line.

Standard library only (the host may not have pipeline_cluster yet), and nothing newer than Python 3.6 syntax, so an
old interpreter gets a clear version error instead of a SyntaxError. Each command prints one JSON value on stdout:

    probe WORKDIR VENV PKGS     python version, installed pipeline_cluster version and code hash (of the
                                comma-separated packages PKGS), absolute work dir, cached venv
    install WHEEL VENV SECONDS  create VENV (seeing this python's packages) and pip install WHEEL into it, once,
                                within SECONDS; stdin's JSON line is the environment added for the install
    stop DIR GRACE              SIGTERM (then SIGKILL after GRACE s) every node whose pidfile is under DIR
    status DIR                  the nodes whose pidfiles are under DIR, and whether each still runs
    logs DIR NODE LINES [RUN]   the last LINES lines of NODE's node.log in run RUN (default: the latest run)
    follow DIR NODE LINES       those of the latest run as text, then what is appended, and the logs of newer runs
                                as they start, until stdin ends (the deployment closed its channel)

A pidfile counts only while its process runs in the pidfile's own directory (deployed nodes are started there),
so a recycled pid is never signalled; nothing is ever looked up or killed by name.
"""
import collections
import fcntl
import glob
import hashlib
import importlib
import json
import os
import select
import signal
import site
import subprocess
import sys
import time

READY_MARK = ".pipeline-cluster-ready"


def _emit(value):
    sys.stdout.write(json.dumps(value) + "\n")


def package_files(packages):
    """Archive path -> bytes of every module of `packages`, read from where this python imports them."""
    files = collections.OrderedDict()
    for package in packages:
        directory = os.path.dirname(importlib.import_module(package).__file__)
        for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
            with open(path, "rb") as f:
                files[package.replace(".", "/") + "/" + os.path.basename(path)] = f.read()
    return files


def code_hash(files):
    """A sha256 over the modules' names and contents: the same code gives the same hash, whatever its version."""
    digest = hashlib.sha256()
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def probe(workdir, venv, packages):
    """Report what the deployment needs to decide whether to ship, creating the work dir's layout."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    for sub in ("wheels", "venvs", "runs"):
        os.makedirs(os.path.join(workdir, sub), mode=0o700, exist_ok=True)
    try:
        import pipeline_cluster
        installed = pipeline_cluster.__version__
    except Exception:
        installed = None
    try:
        code = code_hash(package_files(packages.split(","))) if installed else None
    except Exception:
        code = None  # an install that lacks one of the packages: not the code being shipped
    venv_dir = os.path.join(workdir, "venvs", venv)
    _emit({"python": list(sys.version_info[:3]), "executable": sys.executable, "installed": installed,
           "code": code, "workdir": workdir, "venv": venv_dir,
           "cached": os.path.exists(os.path.join(venv_dir, READY_MARK))})


def _private_input():
    """The JSON line after this script on stdin ({} when there is none)."""
    line = sys.stdin.buffer.readline()
    return json.loads(line.decode()) if line.strip() else {}


def _fail(text, status):
    sys.stderr.write(text + "\n")
    sys.exit(status)


def _run(args, env, deadline):
    """Run `args` in a process group of its own; kill the whole group once it is done, failed or out of time."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                            env=env, start_new_session=True)
    try:
        out = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group's leader is not reaped yet: its id is still ours
        proc.wait()
        _fail("out of time (install_timeout): killed %s and its process group (pid %d)" % (" ".join(args), proc.pid),
              124)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever it left running (build processes of a failed pip)
    except OSError:
        pass  # nothing left
    if proc.returncode != 0:
        sys.stderr.write(out)
        _fail("command failed (exit status %d): %s" % (proc.returncode, " ".join(args)), proc.returncode)


def _lock(lock, path, deadline):
    """Hold `lock` (an open file), waiting at most until `deadline`; then note who holds it, for the next waiter."""
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() >= deadline:
                lock.seek(0)
                _fail("out of time (install_timeout) waiting for %s, held by %s" % (path, lock.read().strip()
                                                                                    or "another install"), 75)
            time.sleep(0.1)
    lock.seek(0)
    lock.truncate()
    lock.write("the install of pid %d on %s, since %s\n" % (os.getpid(), os.uname()[1], time.strftime("%c")))
    lock.flush()


def install(wheel, venv, seconds, wheelhouse=""):
    """Make VENV hold WHEEL, once, within `seconds`; dependencies this python already has are reused, others come
    from its index (reached with the environment given on stdin: index URL, proxies...), or, with `wheelhouse` (a
    directory of shipped wheels), from there alone.

    The venv sees this interpreter's site-packages through a .pth file (like --system-site-packages, but also when
    this python is itself a venv), so pip installs only what is missing; a python without pip gets ensurepip.
    Every step runs in its own process group, killed whole when it fails or time runs out: nothing is left
    holding the venv's lock.
    """
    deadline = time.monotonic() + float(seconds)
    env = dict(os.environ, **_private_input())
    with open(venv + ".lock", "a+") as lock:
        _lock(lock, venv + ".lock", deadline)  # several nodes (or roots) shipping to one host install once
        if os.path.exists(os.path.join(venv, READY_MARK)):
            _emit({"cached": True})
            return
        subprocess.run(["rm", "-rf", venv], check=True)
        _run([sys.executable, "-m", "venv", "--without-pip", venv], env, deadline)
        python = os.path.join(venv, "bin", "python")
        own_site = os.path.join(venv, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")
        with open(os.path.join(own_site, "_pipeline_cluster_host_site.pth"), "w") as pth:
            pth.write("".join(path + "\n" for path in site.getsitepackages() if os.path.isdir(path)))
        if subprocess.run([python, "-c", "import pip"], stderr=subprocess.DEVNULL).returncode != 0:
            _run([python, "-m", "ensurepip", "--default-pip"], env, deadline)
        local = ["--no-index", "--find-links", wheelhouse] if wheelhouse else []
        _run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet", *local, wheel],
             env, deadline)
        with open(os.path.join(venv, READY_MARK), "w") as mark:
            mark.write(os.path.basename(wheel) + "\n")
    _emit({"cached": False})


def _running_in(pid, directory):
    """Whether `pid` is a live (not zombie) process whose working directory is `directory`."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z" and os.path.realpath(os.readlink("/proc/%d/cwd" % pid)) == os.path.realpath(directory)
    except (OSError, IndexError):
        return False


def _pidfiles(directory):
    found = []
    for path in sorted(glob.glob(os.path.join(os.path.expanduser(directory), "**", "node-*.pid"), recursive=True)):
        try:
            with open(path) as f:
                found.append((path, int(f.read().strip())))
        except (OSError, ValueError):
            found.append((path, None))
    return found


def stop(directory, grace):
    """Stop every node with a pidfile under `directory`: SIGTERM, SIGKILL after `grace` s; drop stale pidfiles."""
    deadline = time.monotonic() + float(grace)
    report = []
    for path, pid in _pidfiles(directory):
        running = pid is not None and _running_in(pid, os.path.dirname(path))
        if running:
            os.kill(pid, signal.SIGTERM)
        report.append({"pidfile": path, "pid": pid, "result": "terminated" if running else "not running"})
    live = [r for r in report if r["result"] == "terminated"]
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [r for r in live if _running_in(r["pid"], os.path.dirname(r["pidfile"]))]
    for entry in live:
        try:
            os.kill(entry["pid"], signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)
            entry["result"] = "killed"
        except OSError:
            pass  # it exited at the last moment
    for entry in report:
        try:
            os.unlink(entry["pidfile"])
        except OSError:
            pass  # the node removed its own pidfile on the way out
    _emit(report)


def status(directory):
    """List the nodes with pidfiles under `directory`: run, node, pid, alive."""
    report = []
    for path, pid in _pidfiles(directory):
        node_dir = os.path.dirname(path)
        report.append({"run": os.path.basename(os.path.dirname(node_dir)), "node": os.path.basename(node_dir),
                       "pid": pid, "alive": pid is not None and _running_in(pid, node_dir)})
    _emit(report)


def _latest_log(directory, node):
    """(run, path) of the newest run under `directory` with a log of `node`; (None, None) when there is none."""
    runs = sorted(os.listdir(directory), reverse=True) if os.path.isdir(directory) else []
    for name in runs:
        path = os.path.join(directory, name, node, "node.log")
        if os.path.exists(path):
            return name, path
    return None, None


def logs(directory, node, lines, run=None):
    """Print the tail of a node's log, from run `run` or else the latest run that has one."""
    directory = os.path.expanduser(directory)
    name, path = (run, os.path.join(directory, run, node, "node.log")) if run else _latest_log(directory, node)
    if path is None or not os.path.exists(path):
        _emit({"run": None, "path": None, "text": ""})
        return
    with open(path, errors="replace") as f:
        tail = collections.deque(f, maxlen=int(lines))
    _emit({"run": name, "path": path, "text": "".join(tail)})


def follow(directory, node, lines):
    """Write the tail of a node's latest log, then what is appended to it; a newer run's log, once one starts, from
    its beginning. Ends when stdin does: the root's SSH channel closed, so no follower outlives its reader."""
    directory = os.path.expanduser(directory)
    run, log = None, None
    try:
        while True:
            latest, path = _latest_log(directory, node)
            if latest != run:
                if log is not None:
                    log.close()
                log = open(path, errors="replace")
                sys.stdout.write("==> run %s <==\n" % latest)
                if run is None:
                    sys.stdout.write("".join(collections.deque(log, maxlen=int(lines))))
                run = latest
            if log is not None:
                sys.stdout.write(log.read())
            sys.stdout.flush()
            if select.select([0], [], [], 0.2)[0] and not os.read(0, 4096):
                return
    finally:
        if log is not None:
            log.close()


def main(argv):
    """Dispatch one command."""
    commands = {"probe": probe, "install": install, "stop": stop, "status": status, "logs": logs, "follow": follow}
    if not argv or argv[0] not in commands:
        sys.exit("usage: python - {%s} ARGS..." % "|".join(commands))
    commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
