#!/bin/bash
# extract.sh ROUNDS name=dir ... : interleaved `tar x` of quick.tar as the namespace root
rounds=$1; shift
declare -A t
for ((r = 0; r < rounds; r++)); do
  args=("$@"); n=${#args[@]}; k=$((r % n)); order=("${args[@]:k}" "${args[@]:0:k}")
  for cd in "${order[@]}"; do
    c=${cd%%=*}; d=${cd#*=}
    rm -rf "$d/x"; mkdir "$d/x"
    s=$(date +%s.%N); tar -xf /var/tmp/sshenv/quick.tar -C "$d/x" 2>/dev/null; e=$(date +%s.%N)
    rm -rf "$d/x"
    [ $r = 0 ] || t[$c]+="$(echo "$e - $s" | bc) "
  done
done
for cd in "$@"; do c=${cd%%=*}; echo "$c ${t[$c]}"; done
