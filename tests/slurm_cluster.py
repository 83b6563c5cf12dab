"""A real one-node SLURM cluster on localhost, in a temporary directory, for the tests.

    python tests/slurm_cluster.py DIR     # starts one, prints `export SLURM_CONF=...`, waits
                                          # for Ctrl-C, stops it

munged (its key, socket and logs in DIR/munge), slurmctld and slurmd (config, state, spool and
logs in DIR; ports the OS picks), no accounting (no slurmdbd: `sacct` is not used by the code),
no cgroups (proctrack/linuxproc, task/none): what Debian's `slurmctld slurmd slurm-client munge`
packages need as root in a container. The node claims 8 CPUs whatever the machine has (jobs
share the cores), so two 2-task jobs or two sweep trials fit at once. Every job a test runs is a
record in `scontrol show job` (kept 30 minutes) and in DIR/jobcomp.txt (one line as each ends).
slurmctld alone can be stopped and started again (an outage, a restart), and DIR/quick.conf
points commands at the same cluster but makes them give up in 1 s, not 9 s, while it is down.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

PROGRAMS = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'srun', 'squeue', 'scontrol')
INSTALL = 'apt-get install -y slurmctld slurmd slurm-client munge'


def missing() -> list[str]:
  """The SLURM programs not on PATH (empty: a cluster can start here)."""
  return [p for p in PROGRAMS if shutil.which(p) is None and
          not os.path.exists(os.path.join('/usr/sbin', p))]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def _program(name: str) -> str:
  return shutil.which(name) or os.path.join('/usr/sbin', name)


CONFIG = """\
ClusterName=alexnet_jax_test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
DefMemPerCPU=500
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
FirstJobId={first_job}
MinJobAge=1800
KillWait=60
SchedulerParameters=sched_interval=1
MessageTimeout={message_timeout}
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
  """Starts munged, slurmctld and slurmd; `env` points SLURM's commands at this cluster;
  `stop()` ends the three daemons (by the pids they wrote) and every job still there."""

  def __init__(self, directory: str, timeout: float = 60):
    self.dir = os.path.abspath(directory)
    self.conf = os.path.join(self.dir, 'slurm.conf')
    self.quick_conf = os.path.join(self.dir, 'quick.conf')  # for commands: MessageTimeout=1
    self.env = {**os.environ, 'SLURM_CONF': self.conf}
    self.pids: list[int] = []
    for sub in ('munge', 'state', 'spool'):
      os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
    os.chmod(os.path.join(self.dir, 'munge'), 0o700)
    key = os.path.join(self.dir, 'munge', 'munge.key')
    with open(key, 'wb') as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    self.host = socket.gethostname().split('.')[0]
    settings = dict(host=self.host, ctld_port=_free_port(), d_port=_free_port(),
                    user=getpass.getuser(), dir=self.dir, first_job=random.randrange(1000, 60000))
    for path, message_timeout in ((self.conf, 10), (self.quick_conf, 1)):
      with open(path, 'w') as f:
        f.write(CONFIG.format(message_timeout=message_timeout, **settings))
    munge = os.path.join(self.dir, 'munge')
    self._daemon('munged', ['--force', f'--socket={munge}/socket', f'--key-file={key}',
                            f'--log-file={munge}/log', f'--pid-file={munge}/pid',
                            f'--seed-file={munge}/seed'], f'{munge}/pid')
    self._daemon('slurmctld', ['-f', self.conf], self._ctld_pid_file)
    self._daemon('slurmd', ['-f', self.conf], os.path.join(self.dir, 'slurmd.pid'))
    self._wait_for_node(timeout)

  def _wait_for_node(self, timeout: float) -> None:
    """Until slurmctld knows the node is up (idle, or running jobs), or stop() and raise."""
    deadline = time.time() + timeout
    while self.run('sinfo', '-h', '-o', '%t', check=False).strip() not in ('idle', 'mix', 'alloc'):
      if time.time() > deadline:
        self.stop()
        raise RuntimeError(f'the SLURM node did not become idle within {timeout:g} s; see '
                           f'{self.dir}/slurmctld.log and slurmd.log')
      time.sleep(0.2)

  def _daemon(self, name: str, args: list[str], pid_file: str) -> None:
    """Starts a daemon (it forks and writes its pid) and remembers its pid."""
    out = subprocess.run([_program(name), *args], capture_output=True, text=True, env=self.env)
    if out.returncode:
      self.stop()
      raise RuntimeError(f'{name} did not start: {(out.stderr or out.stdout).strip()[-500:]}')
    deadline = time.time() + 20
    while not os.path.exists(pid_file) or not open(pid_file).read().strip():
      if time.time() > deadline:
        self.stop()
        raise RuntimeError(f'{name} wrote no pid file {pid_file}')
      time.sleep(0.05)
    self.pids.append(int(open(pid_file).read()))

  @property
  def _ctld_pid_file(self) -> str:
    return os.path.join(self.dir, 'slurmctld.pid')

  def stop_controller(self) -> None:
    """Ends slurmctld alone, as an outage or a restart does: SLURM's commands fail until
    `start_controller()`."""
    _end(self.pids.pop(1))
    with contextlib.suppress(FileNotFoundError):  # it removes its pid file unless SIGKILLed
      os.remove(self._ctld_pid_file)

  def start_controller(self, timeout: float = 60) -> None:
    """Starts slurmctld again on its saved state (the jobs are kept) and waits until the node is
    back (slurmd registers again within seconds; until then jobs pend: ReqNodeNotAvail)."""
    self._daemon('slurmctld', ['-f', self.conf], self._ctld_pid_file)
    self.pids.insert(1, self.pids.pop())  # stop() ends them in reverse order of start
    self._wait_for_node(timeout)

  def run(self, *command: str, check: bool = True, env: dict[str, str] | None = None,
          cwd: str | None = None) -> str:
    """Runs a SLURM command (sbatch, squeue, scontrol...) against this cluster (`env`: the
    environment, SLURM_CONF added); its stdout."""
    out = subprocess.run(list(command), capture_output=True, text=True, cwd=cwd,
                         env={**(env or self.env), 'SLURM_CONF': self.conf})
    if check and out.returncode:
      raise RuntimeError(f'{" ".join(command)}: {out.stderr.strip()}')
    return out.stdout

  def jobs(self) -> list[dict[str, str]]:
    """SLURM's own record of every job of this cluster (running, queued or ended), as
    `scontrol show job` gives them: {'JobId': ..., 'JobName': ..., 'JobState': ...}."""
    out = self.run('scontrol', '-o', 'show', 'job', check=False)
    return [dict(field.split('=', 1) for field in line.split() if '=' in field)
            for line in out.splitlines() if line.startswith('JobId=')]

  def stop(self) -> None:
    """Cancels what still runs, then ends the daemons this cluster started (newest first)."""
    if len(self.pids) == 3:
      self.run('scancel', '--full', '--user', getpass.getuser(), check=False)
    for pid in reversed(self.pids):
      _end(pid)
    self.pids = []


def _end(pid: int) -> None:
  """Ends a daemon: SIGTERM, and SIGKILL if it is still there 10 s later."""
  try:
    os.kill(pid, signal.SIGTERM)
  except ProcessLookupError:
    return
  for _ in range(100):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.1)
  os.kill(pid, signal.SIGKILL)


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python tests/slurm_cluster.py DIR')
  if missing():
    sys.exit(f'error: {", ".join(missing())} not found; install SLURM: {INSTALL}')
  cluster = Cluster(sys.argv[1])
  print(f'export SLURM_CONF={cluster.conf}  # a one-node cluster; Ctrl-C stops it', flush=True)
  try:
    signal.pause()
  except KeyboardInterrupt:
    pass
  finally:
    cluster.stop()
