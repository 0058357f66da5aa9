// bench_watch: the stopwatch of scripts/bench.sh --peers. Go standard library only.
//
// Polls an app's GET /count ("<records> <requests> [<distinct>]": the shared peers sink,
// examples/bench_app.go or examples/latency_app.go) every -interval over one keep-alive
// connection (TCP, or a Unix socket with -unix) until the app has counted -n records, and
// reads the CPU time (utime+stime) of the -pids from /proc when the first record shows up and
// when the last one does. Then it waits -settle (redeliveries show up as records > distinct),
// reads the peak RSS (VmHWM) of the pids, and prints one line of key=value pairs:
//
//	status=ok records=N requests=R distinct=D first=C0 window_records=W rate=R window=S cpu_window=S cpu_total=S hwm_kib=K
//
// window_records = records at the last poll - records at the first non-zero poll (C0);
// rate = window_records / the time between those polls (window); cpu_window = the CPU seconds the pids used in that window, cpu_total = all of
// it since they started. status is "timeout" if -n was not reached within -timeout, "stalled"
// if the count did not move for -stall, "exited" if a pid disappeared; the exit code is then 1.
//
//	go build -o bench_watch examples/bench_watch.go
//	./bench_watch -url http://127.0.0.1:18080/count -n 200000 -pids 1234
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

var clkTck = 100.0 // USER_HZ; 100 on every Linux architecture the project runs on

// cpuSeconds returns utime+stime of pid, or -1 if it cannot be read.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	// comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return -1
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	s, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return (u + s) / clkTck
}

func sumCPU(pids []int) float64 {
	t := 0.0
	for _, p := range pids {
		if c := cpuSeconds(p); c > 0 {
			t += c
		}
	}
	return t
}

// statusKiB returns the value of a "Name:   123 kB" line of /proc/pid/status, or 0.
func statusKiB(pid int, name string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, name+":"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				v, _ := strconv.ParseInt(f[0], 10, 64)
				return v
			}
		}
	}
	return 0
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] != 'Z'
}

type counts struct{ records, requests, distinct int64 }

func main() {
	url := flag.String("url", "http://127.0.0.1:18080/count", "the app's count URL")
	unix := flag.String("unix", "", "connect to this Unix socket instead of the URL's host")
	n := flag.Int64("n", 0, "records to wait for")
	pidList := flag.String("pids", "", "comma-separated PIDs whose CPU and RSS are measured")
	interval := flag.Duration("interval", 5*time.Millisecond, "poll interval")
	timeout := flag.Duration("timeout", 120*time.Second, "give up after this long")
	stall := flag.Duration("stall", 30*time.Second, "give up when the count does not move for this long")
	settle := flag.Duration("settle", time.Second, "wait this long after the last record, then count again")
	flag.Parse()

	var pids []int
	for _, s := range strings.Split(*pidList, ",") {
		if s = strings.TrimSpace(s); s != "" {
			p, err := strconv.Atoi(s)
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench_watch: bad pid %q\n", s)
				os.Exit(2)
			}
			pids = append(pids, p)
		}
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 1}
	if *unix != "" {
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", *unix)
		}
	}
	client := &http.Client{Transport: tr, Timeout: 2 * time.Second}
	get := func() (counts, bool) {
		resp, err := client.Get(*url)
		if err != nil {
			return counts{}, false
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 256))
		if err != nil || resp.StatusCode != 200 {
			return counts{}, false
		}
		f := strings.Fields(string(b))
		var v [3]int64
		for i := 0; i < len(f) && i < 3; i++ {
			v[i], _ = strconv.ParseInt(f[i], 10, 64)
		}
		if len(f) < 3 {
			v[2] = -1 // the app does not count distinct offsets
		}
		return counts{v[0], v[1], v[2]}, len(f) >= 2
	}

	start := time.Now()
	status := "ok"
	var c, first counts
	var tFirst, tLast time.Time
	cpuFirst, cpuLast := -1.0, -1.0
	lastMove, lastCount := start, int64(-1)
	for {
		now := time.Now()
		got, ok := get()
		if ok {
			c = got
			if c.records != lastCount {
				lastCount, lastMove = c.records, now
			}
			if tFirst.IsZero() && c.records > 0 {
				tFirst, first, cpuFirst = now, c, sumCPU(pids)
			}
			if c.records >= *n {
				tLast, cpuLast = now, sumCPU(pids)
				break
			}
		}
		for _, p := range pids {
			if !alive(p) {
				status = fmt.Sprintf("exited(pid %d)", p)
			}
		}
		if status != "ok" {
			break
		}
		if now.Sub(start) > *timeout {
			status = "timeout"
			break
		}
		if now.Sub(lastMove) > *stall {
			status = "stalled"
			break
		}
		time.Sleep(*interval)
	}
	rate, window := "-", "-"
	windowRecords := c.records - first.records
	cpuWindow := "-"
	if status == "ok" && tLast.After(tFirst) && c.records > first.records {
		w := tLast.Sub(tFirst).Seconds()
		window = fmt.Sprintf("%.3f", w)
		rate = fmt.Sprintf("%.0f", float64(c.records-first.records)/w)
		if cpuFirst >= 0 && cpuLast >= 0 {
			cpuWindow = fmt.Sprintf("%.3f", cpuLast-cpuFirst)
		}
	} else if status != "ok" && !tFirst.IsZero() {
		w := time.Since(tFirst).Seconds()
		window = fmt.Sprintf("%.3f", w)
		rate = fmt.Sprintf("%.0f", float64(c.records-first.records)/w)
	}
	if status == "ok" && *settle > 0 {
		time.Sleep(*settle)
		if got, ok := get(); ok {
			c = got
		}
	}
	var hwm int64
	for _, p := range pids {
		hwm += statusKiB(p, "VmHWM")
	}
	fmt.Printf("status=%s records=%d requests=%d distinct=%d first=%d window_records=%d rate=%s window=%s cpu_window=%s cpu_total=%.3f hwm_kib=%d\n",
		status, c.records, c.requests, c.distinct, first.records, windowRecords, rate, window, cpuWindow, sumCPU(pids), hwm)
	if status != "ok" {
		os.Exit(1)
	}
}
