# Sourced by benches/run.sh and benches/sshfsreq.sh: a private sshd on 127.0.0.1 for an sshfs
# source, with its own host key and a key for root's login made in DIR, nothing of the
# system's sshd configuration or keys.
#
#   start_private_sshd DIR    sets sshd_port and sshd_pid (kill it when done); returns 1,
#                             with sshd's own words on stderr, if it did not listen
# sshfs then logs in with `-o port=$sshd_port,IdentityFile=DIR/root_key,...`.
start_private_sshd() {
  local d=$1 i
  mkdir -m 700 "$d"
  ssh-keygen -q -t ed25519 -N '' -f "$d/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$d/root_key"
  cp "$d/root_key.pub" "$d/authorized_keys"
  mkdir -p /run/sshd # sshd's privilege separation directory, made at boot by the package
  sshd_port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf '%s\n' "Port $sshd_port" "ListenAddress 127.0.0.1" "HostKey $d/host_key" "PidFile $d/sshd.pid" \
    "AuthorizedKeysFile $d/authorized_keys" "PermitRootLogin prohibit-password" "PasswordAuthentication no" \
    "KbdInteractiveAuthentication no" "UsePAM no" "StrictModes no" "Subsystem sftp internal-sftp" \
    "LogLevel ERROR" >"$d/sshd_config"
  /usr/sbin/sshd -D -e -f "$d/sshd_config" </dev/null >/dev/null 2>"$d/sshd.err" &
  sshd_pid=$!
  for ((i = 0; i < 100; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$sshd_port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "the private sshd did not listen on 127.0.0.1:$sshd_port: $(head -c 300 "$d/sshd.err")" >&2
  return 1
}
