#!/bin/sh
# A canned gRPC health answer, as HTTP/2 frames, for `busybox nc -ll -e`:
# SETTINGS; response headers (:status 200, content-type application/grpc);
# HealthCheckResponse{status: SERVING, or NOT_SERVING once /tmp/down
# exists, or $DOWN}; trailers with grpc-status 0. The request is read and
# dropped until the client closes (through a copy of stdin: a background
# command of a script reads /dev/null instead, and the socket, closed with
# the request unread, would answer the client's next segment with a reset
# that can discard the answer before it is read).
exec 3<&0
cat <&3 > /dev/null &
s=1; [ -e "${DOWN:-/tmp/down}" ] && s=2
printf '\000\000\000\004\000\000\000\000\000'
printf '\000\000\024\001\004\000\000\000\001\210\017\020\020application/grpc'
printf "\000\000\007\000\000\000\000\000\001\000\000\000\000\002\010\00$s"
printf '\000\000\017\001\005\000\000\000\001\000\013grpc-status\0010'
wait
