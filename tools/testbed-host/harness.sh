# The test-host side of every end-to-end run: the demo, the e2e tests, the
# benchmarks and the soak command all start their devices and VMMs and wait
# on them through these functions, so that every wait has a bound and every
# failure says which step it was waiting for and shows the last words of the
# guest console, the VMM's stderr, the device's log and the test host's dmesg.
#
# Sourced (POSIX sh, busybox): . "$MICROVM_HARNESS". tools/testbed puts it at
# /opt/microvm/lib/harness.sh in the emulated test host and points
# MICROVM_HARNESS at it in every mode.
#
# What the harness started is recorded in files under $H_DIR, not in shell
# variables, so subshells, the watchdog and the test host's own timeout
# handler (tools/testbed-host/init) see the same VMM and device.
#
#   h_vduse_start NAME ARGS...   start vduse-net, wait for its /dev/vhost-vdpa-N
#   h_vmm_start ARGS...          start a VMM (console and stderr to files)
#   h_wait_console PATTERN SECS STEP   wait for a console line
#   h_wait_file FILE PATTERN SECS STEP  wait for a line in any file
#   h_wait_true SECS STEP CMD... wait until a command succeeds
#   h_go ADDR [PORT]             the host's signal to a guest's `wait_go`
#   h_send ADDR PORT FILE        a file to a guest's `nc -l`, bounded like h_go
#   h_ctl ARGS...                microvm-ctl on the VMM's API socket, bounded
#   h_vmm_wait SECS              wait for the VMM to exit; prints its status
#   h_vmm_stop                   end the VMM (TERM, then KILL)
#   h_stop_pid PID SECS          end any process (TERM, then KILL after SECS)
#   h_wait_on WHAT PID SECS STEP CMD...  h_wait_true tied to process PID
#   h_bounded SECS STEP CMD...   run CMD with a bound (also when it hangs in
#                                the kernel); its output, its status
#   h_parent_load vdpa_sim_net|vdpa_sim_blk [batch_mapping=0|1] [use_va=0|1]
#                                load a vDPA simulator parent (reloads vdpa_sim
#                                when it has other parameters), wait for its
#                                management device (vdpasim_net, vdpasim_blk)
#   h_parent_unload              delete the simulators' devices, unload them
#   h_vdpa_add MGMTDEV NAME [--mac M] [--features HEX]
#                                create a vdpa device; prints /dev/vhost-vdpa-N
#   h_vdpa_del NAME              delete it
#   h_qsd_start NAME IMAGE [writable]  qemu-storage-daemon's vduse-blk export
#                                of a raw IMAGE as vdpa device NAME; prints
#                                /dev/vhost-vdpa-N
#   h_qsd_stop NAME              delete the device, end the daemon
#   h_snapshot_between_infos FILE COPY INFO  a copy of FILE taken between
#                                two identical answers of `info` (kept in INFO)
#   h_fail STEP                  say what failed, show every tail, return 1
#   h_diag                       every tail, the threads' states, the vDPA
#                                parents and devices

H_DIR=${H_DIR:-/run/harness}
mkdir -p "$H_DIR"
H_TAIL=${H_TAIL:-25}

h_log() { echo "harness: $*" >&2; }

h_now() { cut -d. -f1 /proc/uptime; }

# h_set KEY VALUE / h_get KEY: the harness's records.
h_set() { printf '%s\n' "$2" >"$H_DIR/$1"; }
h_get() { cat "$H_DIR/$1" 2>/dev/null; }

# A zombie (exited, not yet reaped by the shell that started it) is not alive.
h_alive() {
	[ -n "$1" ] && kill -0 "$1" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# h_gone PID: the process has exited (or never was).
h_gone() { ! h_alive "$1"; }

h_tail() {
	# h_tail TITLE FILE [LINES]
	[ -n "$2" ] || return 0
	echo "---- $1 ($2, last ${3:-$H_TAIL} lines)"
	if [ -f "$2" ]; then
		tail -n "${3:-$H_TAIL}" "$2" | sed 's/^/  | /'
	else
		echo "  (no such file)"
	fi
}

# The kernel's view of each thread of a process: state, where it sleeps
# (wchan) and its kernel stack, which is what tells a deadlock from a
# guest that stopped talking.
h_threads() {
	# h_threads TITLE PID
	local t name state wchan
	h_alive "$2" || { echo "---- $1: process ${2:-?} is not running"; return 0; }
	echo "---- $1 (pid $2) threads: name state wchan"
	for t in /proc/"$2"/task/*; do
		[ -d "$t" ] || continue
		name=$(cat "$t/comm" 2>/dev/null)
		state=$(sed -n 's/^State:[[:space:]]*//p' "$t/status" 2>/dev/null)
		wchan=$(cat "$t/wchan" 2>/dev/null)
		echo "  | ${t##*/} $name [$state] ${wchan:--}"
		sed 's/^/  |     /' "$t/stack" 2>/dev/null | head -n 12
	done
}

h_diag() {
	local d
	{
		echo "==== harness diagnostics at $(cut -d' ' -f1 /proc/uptime)s of test-host uptime"
		h_tail "guest console" "$(h_get console)"
		h_tail "VMM stderr" "$(h_get vmm_err)"
		for d in "$H_DIR"/dev_log.*; do
			[ -f "$d" ] || continue
			h_tail "device log ${d##*.}" "$(cat "$d")" 15
		done
		h_threads "VMM" "$(h_get vmm_pid)"
		for d in "$H_DIR"/dev_pid.*; do
			[ -f "$d" ] || continue
			h_threads "device ${d##*.}" "$(cat "$d")"
		done
		h_vdpa_state
		echo "---- test host dmesg (last 15 lines)"
		dmesg 2>/dev/null | tail -n 15 | sed 's/^/  | /'
		echo "==== end of diagnostics"
	} >&2
}

h_fail() {
	h_log "FAILED: $*"
	h_diag
	return 1
}

h_wait_file() {
	# h_wait_file FILE PATTERN SECS STEP: until FILE has a line matching
	# PATTERN (grep -E), the VMM exits, or SECS pass.
	local f pattern secs
	f=$1 pattern=$2 secs=$3
	shift 3
	h_wait_true "$secs" "$* ('$pattern' in $f)" grep -qE "$pattern" "$f"
}

h_wait_true() {
	# h_wait_true SECS STEP CMD...: until CMD succeeds, the VMM exits, or
	# SECS pass.
	h_wait_on "the VMM" "$(h_get vmm_pid)" "$@"
}

h_wait_on() {
	# h_wait_on WHAT PID SECS STEP CMD...: until CMD succeeds, process PID
	# (WHAT; none if PID is empty) exits, or SECS pass.
	local what pid secs step end
	what=$1 pid=$2 secs=$3 step=$4
	shift 4
	end=$(($(h_now) + secs))
	until "$@" 2>/dev/null; do
		if [ -n "$pid" ] && ! h_alive "$pid"; then
			"$@" 2>/dev/null && return 0
			h_fail "$step ($what exited first)"
			return 1
		fi
		if [ "$(h_now)" -ge "$end" ]; then
			h_fail "$step (not within ${secs}s)"
			return 1
		fi
		sleep 0.2
	done
}

h_wait_console() {
	h_wait_file "$(h_get console)" "$@"
}

h_vduse_start() {
	# h_vduse_start NAME ARGS...: vduse-net --name NAME ARGS, waited for up
	# to 30 s; prints the device path (/dev/vhost-vdpa-N).
	local name out err end
	name=$1
	shift
	out=/tmp/vduse-$name.out err=/tmp/vduse-$name.err
	vduse-net --name "$name" "$@" >"$out" 2>"$err" &
	h_set "dev_pid.$name" $!
	h_set "dev_log.$name" "$err"
	end=$(($(h_now) + 30))
	until grep -q " ready at " "$out" 2>/dev/null; do
		if ! h_alive "$(h_get "dev_pid.$name")"; then
			h_fail "vduse-net $name to start (it exited)"
			return 1
		fi
		if [ "$(h_now)" -ge "$end" ]; then
			h_fail "vduse-net $name to start (no 'ready' within 30s)"
			return 1
		fi
		sleep 0.1
	done
	sed -n 's/.* ready at \(\/dev\/[^ ]*\).*/\1/p' "$out" | head -n 1
}

h_vduse_stop() {
	# h_vduse_stop NAME
	h_stop_pid "$(h_get "dev_pid.$1")" 5
}

h_stop_pid() {
	# h_stop_pid PID SECS: TERM, then KILL if PID still runs after SECS.
	local pid n
	pid=$1
	h_alive "$pid" || return 0
	kill "$pid" 2>/dev/null
	n=0
	while h_alive "$pid" && [ $n -lt $(($2 * 10)) ]; do n=$((n + 1)); sleep 0.1; done
	h_alive "$pid" && kill -9 "$pid" 2>/dev/null
	return 0
}

h_vmm_start() {
	# h_vmm_start ARGS...: runs ARGS (a VMM command line) in the background,
	# console (stdout) to $H_CONSOLE, stderr to $H_VMM_ERR.
	local console err n
	console=${H_CONSOLE:-/tmp/console.log}
	err=${H_VMM_ERR:-/tmp/vmm.err}
	: >"$console"
	: >"$err"
	h_set console "$console"
	h_set vmm_err "$err"
	rm -f "$H_DIR/vmm_status" "$H_DIR/vmm_pid"
	# A subshell that is the VMM's parent records its exit status, so any
	# shell (a command substitution too) can learn it.
	(
		"$@" >>"$console" 2>>"$err" &
		h_set vmm_pid $!
		wait $!
		h_set vmm_status $?
	) &
	n=0
	while [ ! -s "$H_DIR/vmm_pid" ] && [ $n -lt 50 ]; do n=$((n + 1)); sleep 0.02; done
}

h_vmm_pid() { h_get vmm_pid; }

h_vmm_wait() {
	# h_vmm_wait SECS: waits for the VMM to exit; prints its exit status, or
	# fails (and ends it) after SECS.
	local pid end n
	pid=$(h_get vmm_pid)
	end=$(($(h_now) + $1))
	while h_alive "$pid"; do
		if [ "$(h_now)" -ge "$end" ]; then
			h_fail "the VMM to exit (still running after ${1}s)"
			h_vmm_stop
			echo timeout
			return 1
		fi
		sleep 0.2
	done
	n=0
	while [ ! -s "$H_DIR/vmm_status" ] && [ $n -lt 50 ]; do n=$((n + 1)); sleep 0.1; done
	h_get vmm_status
}

h_vmm_stop() {
	# Ends the VMM (TERM, then KILL after 5 s); its status is then recorded.
	local n
	h_alive "$(h_get vmm_pid)" || return 0
	h_stop_pid "$(h_get vmm_pid)" 5
	n=0
	while [ ! -s "$H_DIR/vmm_status" ] && [ $n -lt 20 ]; do n=$((n + 1)); sleep 0.1; done
	return 0
}

h_send() {
	# h_send ADDR PORT FILE: sends FILE to a guest's `nc -l -p PORT`, with
	# h_go's bounds.
	H_GO_INPUT=$3 h_go "$1" "$2"
}

h_go() {
	# h_go ADDR [PORT]: releases a guest's `wait_go [PORT]` (resources/guest/
	# init) with "go N", N new for each call. Each try is bounded (H_GO_TRY_S,
	# default 5: a plain nc to a wedged guest sits in SYN retries for
	# minutes), and so is the number of tries (H_GO_TRIES, default 60: about
	# 20 s when the guest refuses, 5 min when it never answers). A try that
	# ends at its bound may still have delivered the token; the retry sends
	# the same token, which the guest ignores, so one h_go releases one wait.
	# H_GO_INPUT=FILE sends FILE instead (h_send; not deduplicated).
	local port n vmm seq
	port=${2:-5000}
	seq=$(($(h_get go_seq || echo 0) + 1))
	h_set go_seq "$seq"
	n=0
	until if [ -n "$H_GO_INPUT" ]; then timeout "${H_GO_TRY_S:-5}" nc "$1" "$port" <"$H_GO_INPUT"; else echo "go $seq" | timeout "${H_GO_TRY_S:-5}" nc "$1" "$port"; fi 2>/dev/null; do
		n=$((n + 1))
		vmm=$(h_get vmm_pid)
		if [ -n "$vmm" ] && ! h_alive "$vmm"; then
			h_fail "the guest to take 'go $seq' on $1:$port (the VMM exited)"
			return 1
		fi
		if [ $n -ge "${H_GO_TRIES:-60}" ]; then
			h_fail "the guest to take 'go $seq' on $1:$port (${H_GO_TRIES:-60} tries)"
			return 1
		fi
		sleep 0.3
	done
}

h_ctl() {
	# h_ctl ARGS...: microvm-ctl --socket $H_API ARGS, ended after
	# H_CTL_TIMEOUT seconds (default: 90, past microvm-ctl's own bound for
	# a resize at its default timeout).
	local st
	timeout "${H_CTL_TIMEOUT:-90}" microvm-ctl --socket "${H_API:-/tmp/api.sock}" "$@"
	st=$?
	if [ $st -eq 124 ] || [ $st -eq 143 ]; then
		h_fail "microvm-ctl $* to answer within ${H_CTL_TIMEOUT:-90}s"
		return 1
	fi
	return $st
}

h_snapshot_between_infos() {
	# h_snapshot_between_infos FILE COPY INFO: copies FILE (a device's IOTLB
	# dump) to COPY between two identical answers of `h_ctl info`, kept in
	# INFO, so the two agree although the guest may still map or unmap a
	# buffer now and then; up to 8 tries, then the last pair is kept.
	local try
	try=0
	while [ $try -lt 8 ]; do
		h_ctl info >"$3.a" || return 1
		cp "$1" "$2"
		h_ctl info >"$3" || return 1
		cmp -s "$3.a" "$3" && return 0
		try=$((try + 1))
		sleep 0.5
	done
	h_log "h_snapshot_between_infos: info still changing after 8 tries; keeping the last"
	return 0
}

h_watchdog() {
	# h_watchdog SECS: in the background, dumps h_diag once whenever the
	# guest console has been silent for SECS while the VMM runs (a guest
	# that waits on purpose for long may print nothing; the dump says where
	# everything was, it does not end anything).
	(
		last=-1 quiet=0
		while :; do
			sleep 5
			pid=$(h_get vmm_pid)
			h_alive "$pid" || { quiet=0; last=-1; continue; }
			size=$(wc -c <"$(h_get console)" 2>/dev/null || echo 0)
			if [ "$size" = "$last" ]; then
				quiet=$((quiet + 5))
				if [ $quiet -eq "$1" ]; then
					h_log "watchdog: no console output for ${1}s while the VMM runs"
					h_diag
				fi
			else
				quiet=0
				last=$size
			fi
		done
	) &
	h_set watchdog_pid $!
}

h_watchdog_stop() {
	local pid
	pid=$(h_get watchdog_pid)
	h_alive "$pid" && kill "$pid" 2>/dev/null
	return 0
}

# ---------------------------------------------------------------- vDPA parents

# The vDPA simulator modules (tools/testbed's vdpa-parents step), built for
# the test host's kernel and carried in, never loaded at boot.
H_PARENTS_DIR=${MICROVM_VDPA_PARENTS_DIR:-/lib/modules/microvm/extra}
H_SYS_MODULE=${H_SYS_MODULE:-/sys/module}

h_bounded() {
	# h_bounded SECS STEP CMD...: runs CMD in the background and waits up
	# to SECS for it (a netlink request or rmmod can sleep in the kernel
	# while a vhost-vdpa node is open, where no signal ends it). Prints
	# CMD's stdout (its stderr goes to stderr). A CMD that fails, or is
	# still running after SECS (it is left behind), is h_fail'ed: returns 1.
	local secs step out err pid end st
	secs=$1 step=$2
	shift 2
	out=$(mktemp "$H_DIR/cmd.XXXXXX") || { h_fail "$step (mktemp)"; return 1; }
	err=$out.err
	"$@" >"$out" 2>"$err" &
	pid=$!
	end=$(($(h_now) + secs))
	while h_alive "$pid"; do
		if [ "$(h_now)" -ge "$end" ]; then
			h_fail "$step (still running after ${secs}s, pid $pid: '$*')"
			return 1
		fi
		sleep 0.1
	done
	wait "$pid"
	st=$?
	cat "$out"
	cat "$err" >&2
	rm -f "$out" "$err"
	[ $st -eq 0 ] && return 0
	h_fail "$step (exit status $st: '$*')"
	return 1
}

h_module_loaded() { [ -d "$H_SYS_MODULE/$1" ]; }

# The management device a simulator module registers.
h_parent_mgmtdev() {
	case $1 in
	vdpa_sim_net) echo vdpasim_net ;;
	vdpa_sim_blk) echo vdpasim_blk ;;
	*) return 1 ;;
	esac
}

h_mgmtdev_present() {
	# h_mgmtdev_present NAME: NAME is the first field of a line of
	# `vdpa-mgmt mgmtdev list`.
	vdpa-mgmt mgmtdev list 2>/dev/null | cut -d' ' -f1 | grep -qx "$1"
}

h_parent_load() {
	# h_parent_load vdpa_sim_net|vdpa_sim_blk [batch_mapping=0|1] [use_va=0|1]
	# Loads vringh, vdpa_sim (it owns both parameters; defaults 1 and 1) and
	# the parent from $H_PARENTS_DIR; a vdpa_sim loaded with other
	# parameters is unloaded first (h_parent_unload). Waits up to
	# H_PARENT_WAIT_S (default 10) seconds for the management device.
	local parent mgmt arg batch va have_batch have_va m
	parent=$1
	mgmt=$(h_parent_mgmtdev "$parent") || {
		h_fail "h_parent_load: unknown parent '$parent' (vdpa_sim_net or vdpa_sim_blk)"
		return 1
	}
	shift
	batch=1 va=1
	for arg in "$@"; do
		case $arg in
		batch_mapping=0 | batch_mapping=1) batch=${arg#*=} ;;
		use_va=0 | use_va=1) va=${arg#*=} ;;
		*)
			h_fail "h_parent_load $parent: bad parameter '$arg' (batch_mapping=0|1, use_va=0|1)"
			return 1
			;;
		esac
	done
	if h_module_loaded vdpa_sim; then
		have_batch=$(cat "$H_SYS_MODULE/vdpa_sim/parameters/batch_mapping" 2>/dev/null)
		case $(cat "$H_SYS_MODULE/vdpa_sim/parameters/use_va" 2>/dev/null) in
		Y | 1) have_va=1 ;;
		*) have_va=0 ;;
		esac
		if [ "$have_batch" != "$batch" ] || [ "$have_va" != "$va" ]; then
			h_log "vdpa_sim has batch_mapping=$have_batch use_va=$have_va; reloading with batch_mapping=$batch use_va=$va"
			h_parent_unload || return 1
		fi
	fi
	for m in vringh vdpa_sim "$parent"; do
		h_module_loaded "$m" && continue
		if [ ! -f "$H_PARENTS_DIR/$m.ko" ]; then
			h_fail "h_parent_load $parent: $H_PARENTS_DIR/$m.ko not found (run tools/testbed assets)"
			return 1
		fi
		if [ "$m" = vdpa_sim ]; then
			h_bounded 30 "h_parent_load $parent: insmod $m" \
				insmod "$H_PARENTS_DIR/$m.ko" batch_mapping="$batch" use_va="$va" || return 1
		else
			h_bounded 30 "h_parent_load $parent: insmod $m" insmod "$H_PARENTS_DIR/$m.ko" || return 1
		fi
	done
	h_set parent.vdpa_sim "batch_mapping=$batch use_va=$va"
	h_wait_on "" "" "${H_PARENT_WAIT_S:-10}" "management device $mgmt of $parent to appear" \
		h_mgmtdev_present "$mgmt"
}

h_parent_unload() {
	# Deletes the vdpa devices h_vdpa_add made on the simulators, then
	# unloads vdpa_sim_blk, vdpa_sim_net, vdpa_sim and vringh (each rmmod
	# bounded: a device whose /dev/vhost-vdpa-N is still open keeps rmmod
	# waiting, so end the VMM first).
	local f name m
	for f in "$H_DIR"/vdpa.*; do
		[ -f "$f" ] || continue
		case $(cut -d' ' -f1 "$f") in
		vdpasim_*)
			name=${f##*/vdpa.}
			h_vdpa_del "$name" || return 1
			;;
		esac
	done
	for m in vdpa_sim_blk vdpa_sim_net vdpa_sim vringh; do
		h_module_loaded "$m" || continue
		h_bounded 30 "h_parent_unload: rmmod $m" rmmod "$m" || return 1
	done
	rm -f "$H_DIR/parent.vdpa_sim"
}

h_vdpa_add() {
	# h_vdpa_add MGMTDEV NAME [--mac M] [--features HEX]: creates vdpa device
	# NAME on MGMTDEV, waits up to 10 s for vhost_vdpa to bind it and prints
	# its /dev/vhost-vdpa-N (recorded for h_diag).
	local mgmt name node
	mgmt=$1 name=$2
	shift 2
	h_bounded 30 "h_vdpa_add: creating vdpa device $name on $mgmt" \
		vdpa-mgmt dev add --mgmtdev "$mgmt" --name "$name" "$@" || return 1
	h_set "vdpa.$name" "$mgmt (no vhost-vdpa node yet)"
	node=$(h_bounded 30 "h_vdpa_add: the vhost-vdpa node of $name on $mgmt" \
		vdpa-mgmt dev node "$name" --timeout 10) || return 1
	h_set "vdpa.$name" "$mgmt $node"
	echo "$node"
}

h_vdpa_del() {
	# h_vdpa_del NAME: deletes vdpa device NAME (bounded: the kernel waits for
	# its /dev/vhost-vdpa-N to be closed).
	h_bounded 30 "h_vdpa_del: deleting vdpa device $1" vdpa-mgmt dev del "$1" || return 1
	rm -f "$H_DIR/vdpa.$1"
}

h_qsd_bin() {
	if [ -n "$H_QSD" ]; then
		echo "$H_QSD"
	elif [ -x /opt/peers/qsd/qemu-storage-daemon ]; then
		echo /opt/peers/qsd/qemu-storage-daemon
	else
		command -v qemu-storage-daemon
	fi
}

h_qsd_start() {
	# h_qsd_start NAME IMAGE [writable]: qemu-storage-daemon (tools/testbed
	# run --qsd) exports the raw file IMAGE as VDUSE block device NAME
	# (vduse-blk, one queue, read-only unless "writable"); NAME is then
	# added on management device vduse. Prints /dev/vhost-vdpa-N. Its log
	# is /tmp/qsd-NAME.log (in h_diag's tails).
	local name image wr qsd log
	name=$1 image=$2 wr=off
	case ${3:-} in
	"") ;;
	writable) wr=on ;;
	*)
		h_fail "h_qsd_start $name: third argument '$3' is not 'writable'"
		return 1
		;;
	esac
	case $name$image in
	*,* | *=*)
		h_fail "h_qsd_start: NAME and IMAGE may not contain ',' or '=' ('$name', '$image')"
		return 1
		;;
	esac
	[ -n "$name" ] && [ -f "$image" ] || {
		h_fail "h_qsd_start '$name': image '$image' is not a file"
		return 1
	}
	qsd=$(h_qsd_bin)
	[ -n "$qsd" ] || {
		h_fail "h_qsd_start $name: no qemu-storage-daemon (run the test host with --qsd)"
		return 1
	}
	log=/tmp/qsd-$name.log
	"$qsd" --blockdev "driver=file,node-name=file-$name,filename=$image" \
		--blockdev "driver=raw,node-name=disk-$name,file=file-$name" \
		--export "type=vduse-blk,id=exp-$name,node-name=disk-$name,name=$name,writable=$wr,num-queues=1" \
		>"$log" 2>&1 </dev/null &
	h_set "dev_pid.qsd-$name" $!
	h_set "dev_log.qsd-$name" "$log"
	h_wait_on "qemu-storage-daemon $name" "$(h_get "dev_pid.qsd-$name")" 30 \
		"qemu-storage-daemon to create VDUSE device $name" test -c "/dev/vduse/$name" || return 1
	h_vdpa_add vduse "$name"
}

h_qsd_stop() {
	# h_qsd_stop NAME: deletes vdpa device NAME, then ends its daemon (TERM,
	# KILL after 5 s).
	if [ -f "$H_DIR/vdpa.$1" ]; then
		h_vdpa_del "$1" || return 1
	fi
	h_stop_pid "$(h_get "dev_pid.qsd-$1")" 5
}

h_vdpa_state() {
	# For h_diag: the parents' modules and parameters, the management
	# devices, the vdpa devices and what the harness made of them.
	local f
	echo "---- vDPA parents and devices"
	for f in vringh vdpa_sim vdpa_sim_net vdpa_sim_blk vduse vhost_vdpa virtio_vdpa; do
		h_module_loaded "$f" && printf '  | module %s loaded%s\n' "$f" \
			"$([ "$f" = vdpa_sim ] && printf ' (batch_mapping=%s use_va=%s)' \
				"$(cat "$H_SYS_MODULE/vdpa_sim/parameters/batch_mapping" 2>/dev/null)" \
				"$(cat "$H_SYS_MODULE/vdpa_sim/parameters/use_va" 2>/dev/null)")"
	done
	if command -v vdpa-mgmt >/dev/null 2>&1; then
		timeout 5 vdpa-mgmt mgmtdev list 2>&1 | sed 's/^/  | mgmtdev /'
	fi
	for f in /sys/bus/vdpa/devices/*; do
		[ -e "$f" ] || continue
		printf '  | vdpa device %s: driver %s, %s\n' "${f##*/}" \
			"$(basename "$(readlink "$f/driver" 2>/dev/null)" 2>/dev/null)" \
			"$(ls -d "$f"/vhost-vdpa-* 2>/dev/null | sed 's|.*/||' | tr '\n' ' ')"
	done
	for f in "$H_DIR"/vdpa.*; do
		[ -f "$f" ] || continue
		echo "  | harness made ${f##*/vdpa.}: $(cat "$f")"
	done
}
