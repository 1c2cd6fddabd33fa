#!/bin/sh
# PID 1 of the test guest (busybox sh). Brings up eth0 (virtio-net) and runs the
# guest agent on the second serial port (ttyS1); with vnet.shell on the kernel command
# line, also a shell on the console (ttyS0).
#
# Agent protocol, one request per line from the host:  <token> <base64 of a sh script>
# Reply:  VNET-BEGIN <token>\n <output of the script, stdout+stderr> \nVNET-END <token> <status>\n
# The line VNET-GUEST-READY announces that eth0 is up and requests are served;
# VNET-GUEST-FAILED <reason> that the guest cannot serve them.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
AGENT_TTY=/dev/ttyS1

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mkdir -p /tmp

fail() {
    echo "init: $*"
    printf 'VNET-GUEST-FAILED %s\n' "$*" > "$AGENT_TTY"
    exec sh
}

stty -F "$AGENT_TTY" raw -echo || fail "cannot set up $AGENT_TTY"

# The virtio-net stack, in the order scripts/build-guest wrote (without what is built in).
while read -r module; do
    insmod "/modules/$module.ko" || fail "insmod $module"
done < /modules/boot-order
# virtio_net probes the device while its insmod runs, so eth0 exists now or never.
[ -e /sys/class/net/eth0 ] || fail "no eth0 after loading virtio_net"
ip link set lo up
# Promiscuous mode: the device then delivers every frame, whatever its MAC or VLAN id.
ip link set eth0 promisc on || fail "eth0 promisc"
ip link set eth0 up || fail "eth0 up"

# vnet.shell on the kernel command line (vnetbackend vm): a shell on the console for a
# person, beside the agent.
if grep -qw vnet.shell /proc/cmdline; then
    setsid cttyhack sh &
fi

exec 3<>"$AGENT_TTY"
printf 'VNET-GUEST-READY %s\n' "$(uname -r)" >&3
while read -r token encoded <&3; do
    [ -n "$token" ] || continue
    printf '%s' "$encoded" | base64 -d > /tmp/request 2>/dev/null
    printf 'VNET-BEGIN %s\n' "$token" >&3
    sh /tmp/request < /dev/null >&3 2>&3
    status=$?
    printf '\nVNET-END %s %d\n' "$token" "$status" >&3
done
fail "agent port closed"
