# A game server that goes wrong in the way asked, through the SDK (docs/sdk.md) with busybox
# wget. FAULT=boot_crash (kernel command line): dies while loading. Else it says initialised,
# waits for its activation, and does what the session's params.fault says:
#   crash        ready, then dies (the session ends game_crashed)
#   never_ready  never says ready (the activation times out)
#   silent       ready, then never calls health (the session ends game_unhealthy)
#   misuse       calls out of order and with bad bodies, then ends with the status codes got
#   (none)       ready, health every second, ends "done" after 3 s
SDK="http://${BERTH_SDK:-127.0.0.1:7001}"
bb=/bin/busybox

# call PATH [BODY]: POST (GET without a body); prints the HTTP status, the answer in /tmp/answer.
call() {
  if [ $# -ge 2 ]; then
    $bb wget -S -q -O /tmp/answer --post-data "$2" "$SDK$1" 2>/tmp/headers
  else
    $bb wget -S -q -O /tmp/answer "$SDK$1" 2>/tmp/headers
  fi
  $bb sed -n 's/^ *HTTP\/1\.[01] \([0-9][0-9][0-9]\).*/\1/p' /tmp/headers | $bb tail -n 1
}

if [ "$FAULT" = boot_crash ]; then
  echo "faulty: loading level 3 failed: checksum mismatch" >&2
  exit 3
fi
echo "faulty: loaded"
call /v1/initialised '{}' >/dev/null
call /v1/activation >/dev/null
fault=$($bb sed -n 's/.*"fault":"\([a-z_]*\)".*/\1/p' /tmp/answer)
echo "faulty: activated, fault=${fault:-none}"
case "$fault" in
  crash)
    call /v1/ready '{}' >/dev/null
    echo "faulty: about to crash" >&2
    exit 4 ;;
  never_ready)
    while true; do $bb sleep 60; done ;;
  silent)
    call /v1/ready '{}' >/dev/null
    while true; do $bb sleep 60; done ;;
  misuse)
    again=$(call /v1/initialised '{}')
    bad_reason=$(call /v1/ended '{"reason":"Not Valid"}')
    bad_body=$(call /v1/tickets/verify '{"nope":1}')
    unknown=$(call /v1/nothing '{}')
    ready=$(call /v1/ready '{}')
    ended=$(call /v1/ended "{\"reason\":\"misused\",\"results\":{\"initialised_again\":$again,\"bad_reason\":$bad_reason,\"bad_body\":$bad_body,\"unknown\":$unknown,\"ready\":$ready}}")
    twice=$(call /v1/ended '{"reason":"misused"}')
    echo "faulty: ended $ended, twice $twice"
    while true; do $bb sleep 60; done ;;
  *)
    call /v1/ready '{}' >/dev/null
    for i in 1 2 3; do $bb sleep 1; call /v1/health '{}' >/dev/null; done
    call /v1/ended '{"reason":"done","results":{}}' >/dev/null
    while true; do $bb sleep 60; done ;;
esac
