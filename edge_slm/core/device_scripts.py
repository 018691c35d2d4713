"""Scripts that edge-slm runs on a device with the device's own Python (stdlib only), kept in the device
half so that the device never imports the host half to get them: `deploy` (`harness/deploy.py`,
`harness/device_service.py`) sends them over SSH, and the Ansible role imports them from the
device's edge-slm install."""

# Checks every installed edge_slm file against the sha256 pip recorded from the wheel.
RECORD_CHECK = """
import base64, hashlib, pathlib, sys, importlib.metadata as md
dist = md.distribution("edge-slm")
bad = []
for f in dist.files or []:
    if f.hash is None or f.hash.mode != "sha256":
        continue
    path = pathlib.Path(f.locate())
    digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode() \\
        if path.is_file() else None
    if digest != f.hash.value:
        bad.append(str(f))
print(len(bad), " ".join(bad[:3]))
"""

# The device half of copy_bundle, stdlib only. "stage": a fresh folder beside the bundles with every
# wanted file already on the device hard-linked into it (a second name for the same inode: nothing
# is written into a file a running server may have memory-mapped) or copied where links fail;
# "publish": the copied files checked, the folder renamed into its versioned place (a damaged
# folder of the same name is renamed aside first, to .replaced-*, and removed by "sweep").
STAGE_SCRIPT = r"""
import hashlib, json, os, shutil, sys, time
A = json.loads(sys.argv[1])
os.chdir(os.path.expanduser("~"))
root, name, want = A["bundles"], A["name"], A["files"]
target = os.path.join(root, name)
staging = os.path.join(root, ".staging-%s-%s" % (name, A["token"]))

def sha(path, size=None):
    if not os.path.isfile(path) or os.path.islink(path) or (size is not None and os.path.getsize(path) != size):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def whole(folder):
    return os.path.isdir(folder) and not os.path.islink(folder) and sorted(os.listdir(folder)) == sorted(want) \
        and all(sha(os.path.join(folder, n), w.get("bytes")) == w["sha256"] for n, w in want.items())

os.makedirs(root, exist_ok=True)
if A["action"] == "stage":
    if whole(target):
        print(json.dumps({"present": True})); sys.exit(0)
    for old in os.listdir(root):  # staging folders of deploys killed over a day ago
        path = os.path.join(root, old)
        if old.startswith(".staging-") and time.time() - os.path.getmtime(path) > 86400:
            shutil.rmtree(path, ignore_errors=True)
    os.mkdir(staging)
    sources = [target] + [os.path.join(root, d) for d in sorted(os.listdir(root)) if not d.startswith(".")]
    missing, linked = [], 0
    for n, w in want.items():
        src = next((os.path.join(d, n) for d in sources
                    if sha(os.path.join(d, n), w.get("bytes")) == w["sha256"]), None)
        if src is None:
            missing.append(n); continue
        try:
            os.link(src, os.path.join(staging, n))
        except OSError:
            shutil.copyfile(src, os.path.join(staging, n))
        linked += 1
    print(json.dumps({"present": False, "missing": missing, "linked": linked}))
elif A["action"] == "publish":
    bad = [n for n in A["copied"] if sha(os.path.join(staging, n), want[n].get("bytes")) != want[n]["sha256"]]
    if bad or sorted(os.listdir(staging)) != sorted(want):
        shutil.rmtree(staging, ignore_errors=True)
        print(json.dumps({"bad": bad or ["(the folder's file list)"]})); sys.exit(0)
    if os.path.lexists(target):
        os.rename(target, os.path.join(root, ".replaced-%s-%s" % (name, A["token"])))
    os.rename(staging, target)
    print(json.dumps({"bad": []}))
elif A["action"] == "current":
    # `current` -> the served bundle, replaced in one rename; a `current` that is not a link is not ours.
    link = os.path.join(os.path.dirname(root), "current")
    if os.path.islink(link) or not os.path.lexists(link):
        tmp = "%s.tmp-%d" % (link, os.getpid())
        os.symlink(os.path.relpath(target, os.path.dirname(link)), tmp)
        os.replace(tmp, link)
    print(json.dumps({}))
elif A["action"] == "sweep":
    # .replaced-* folders, and (named) versioned folders no longer served; only names deploy made.
    for old in os.listdir(root):
        if old.startswith(".replaced-") or old in A.get("remove", []):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    print(json.dumps({}))
"""

DEVICE_SCRIPT = r"""
import errno, json, os, signal, socket, subprocess, sys, time, urllib.request
A = json.loads(sys.argv[1])
os.chdir(os.path.expanduser("~"))
STATE = A["home_dir"]
RECORD = os.path.join(STATE, "serve.json")
UNIT_DIR = ".config/systemd/user"
MARK = "# Written by edge-slm deploy: it starts, stops and replaces this unit."

def reply(**kw):
    print(json.dumps(kw)); sys.exit(0)

def start_time(pid):
    # Field 22 of /proc/PID/stat; None when there is no such process or it is a zombie.
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except (OSError, ValueError, TypeError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]

def read_record():
    try:
        with open(RECORD) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    return r if isinstance(r, dict) else None

def write_record(r):
    with open(RECORD + ".tmp", "w") as f:
        json.dump(r, f)
    os.replace(RECORD + ".tmp", RECORD)

def unit_path(name):
    return os.path.join(UNIT_DIR, name + ".service")

def unit_is_ours(name):
    try:
        with open(unit_path(name)) as f:
            return MARK in f.read()
    except OSError:
        return None  # no unit

def systemctl(*args):
    return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True)

def server_pid(r):
    if r.get("systemd"):
        out = systemctl("show", "-p", "MainPID", "--value", r["unit"] + ".service").stdout.strip()
        return int(out) if out.isdigit() and out != "0" else None
    return r.get("pid")

def state(r):
    # running: the recorded process is alive; gone: it exited; reused: its pid is another process now.
    if r.get("systemd"):
        return "running" if server_pid(r) else "gone"
    now = start_time(r.get("pid"))
    if now is None:
        return "gone"
    return "running" if now == r.get("start_time") else "reused"

def listening_inodes(port):
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes

def socket_inodes(pid):
    found = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            if link.startswith("socket:["):
                found.add(link[8:-1])
    except (OSError, TypeError):
        pass
    return found

def holders(port):
    # The processes of this user that hold a listening socket on the port (others' are not visible).
    inodes, names = listening_inodes(port), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and socket_inodes(int(entry)) & inodes:
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            names.append("pid %s: %s" % (entry, cmd[:80]))
    return names

def bindable(host, port):
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(address)
        return None
    except OSError as exc:
        return exc

def log_tail():
    try:
        with open(os.path.join(STATE, "serve.log"), "rb") as f:
            lines = f.read()[-4000:].decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])
    except OSError:
        return "no log"

def signal_recorded(pid, started, sig):
    # The pidfd is taken before the start time is compared, so the signal reaches the process that
    # was compared even if it exits and its pid is reused in between (os.kill as a fallback).
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        if start_time(pid) != started:
            return
        if fd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass
    finally:
        if fd is not None:
            os.close(fd)

def stop(r):
    if r.get("systemd"):
        if unit_is_ours(r["unit"]):
            systemctl("disable", "--now", r["unit"] + ".service")
        return "stopped"
    st = state(r)
    if st == "reused":
        return "reused"
    if st == "running":
        pid, started = r["pid"], r["start_time"]
        signal_recorded(pid, started, signal.SIGTERM)
        for _ in range(150):
            if start_time(pid) != started:
                break
            time.sleep(0.1)
        else:
            signal_recorded(pid, started, signal.SIGKILL)
            for _ in range(50):
                if start_time(pid) != started:
                    break
                time.sleep(0.1)
    return "stopped"

action, r = A["action"], read_record()
if action == "status":
    if r is None:
        reply(state="stopped")
    reply(state=state(r), record=r)
if action == "stop":
    if r is None:
        reply(state="stopped")
    result = stop(r)
    os.remove(RECORD)
    reply(state=result, pid=r.get("pid"), record=r)
if action == "check_port":
    host, port = A["host"], A["port"]
    problem = bindable(host, port)
    if problem is None:
        reply(free=True)
    ours = r is not None and r.get("port") == port and state(r) == "running"
    if ours and socket_inodes(server_pid(r)) & listening_inodes(port):
        reply(free=True, ours=True)
    in_use = getattr(problem, "errno", None) == errno.EADDRINUSE
    reply(free=False, in_use=in_use, problem=getattr(problem, "strerror", None) or str(problem),
          holders=holders(port) if in_use else [])
if action == "start":
    cmd, port = A["command"], A["port"]
    record = {"port": port, "listen": A["listen"], "bundle": A["bundle"], "threads": A.get("threads")}
    if A["systemd"]:
        os.makedirs(UNIT_DIR, exist_ok=True)
        SERVICE_NAME = A["unit"]
        if unit_is_ours(SERVICE_NAME) is False:
            reply(error="~/%s was not written by edge-slm deploy: rename or remove it, then deploy again"
                  % unit_path(SERVICE_NAME))
        unit = "\n".join([MARK, "[Unit]", "Description=edge-slm serve (%s)" % A["bundle"],
                          "After=network-online.target", "", "[Service]", "ExecStart=" + " ".join(cmd),
                          "StandardOutput=append:%h/" + STATE + "/serve.log", "StandardError=inherit",
                          "Restart=on-failure", "RestartSec=3", "", "[Install]", "WantedBy=default.target", ""])
        with open(unit_path(SERVICE_NAME) + ".tmp", "w") as f:
            f.write(unit)
        os.replace(unit_path(SERVICE_NAME) + ".tmp", unit_path(SERVICE_NAME))
        open(os.path.join(STATE, "serve.log"), "wb").close()
        subprocess.run(["loginctl", "enable-linger", os.environ.get("USER", "")], capture_output=True)
        systemctl("daemon-reload")
        done = systemctl("enable", "--now", SERVICE_NAME + ".service")
        if done.returncode:
            reply(error="systemctl --user enable --now failed: " + (done.stderr.strip().splitlines() or ["?"])[-1])
        write_record(dict(record, systemd=True, unit=SERVICE_NAME))
        reply(started=True)
    with open(os.path.join(STATE, "serve.log"), "wb") as log:
        proc = subprocess.Popen([os.path.expanduser(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    write_record(dict(record, pid=proc.pid, start_time=start_time(proc.pid)))
    reply(started=True, pid=proc.pid)
if action == "wait":
    # Up means: our recorded process is alive, /health says ok, and the port's listening socket is its own.
    port, host = r["port"], A["probe_host"]
    deadline = time.time() + A["seconds"]
    while time.time() < deadline:
        restarts = systemctl("show", "-p", "NRestarts", "--value", r["unit"] + ".service").stdout.strip() \
            if r.get("systemd") else ""
        if (state(r) != "running" and not r.get("systemd")) or restarts not in ("", "0"):
            reply(up=False, why="the server exited (%s)" % log_tail())
        try:
            body = json.loads(urllib.request.urlopen("http://%s:%d/health" % (host, port), timeout=2).read())
            if body.get("status") == "ok" and socket_inodes(server_pid(r)) & listening_inodes(port):
                reply(up=True, pid=server_pid(r))
        except Exception:
            pass
        time.sleep(0.5)
    reply(up=False, why="no answer on /health within %d s (%s)" % (A["seconds"], log_tail()))
reply(error="unknown action " + action)
"""
