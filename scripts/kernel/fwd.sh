#!/bin/sh
# One guest TCP connection, forwarded by qemu's user-mode network (guestfwd
# "cmd:" form, which starts this once per connection with the connection on
# stdin/stdout) to a server on the host's loopback.
# usage: fwd.sh LOGFILE GUESTPORT HOSTPORT
echo "$(date +%s.%N) guest:$2 -> 127.0.0.1:$3" >> "$1"
exec socat - "TCP:127.0.0.1:$3"
