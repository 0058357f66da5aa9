// latency_app: end-to-end latency app for scripts/bench.sh --peers. Go standard library only.
//
// Every POST is answered 200 at once. Its body is a record value (single mode) whose first
// bytes are the decimal Unix time in nanoseconds at which examples/rate_producer.go wrote the
// record; the app takes the receive time minus that stamp as the record's latency. Bodies that
// do not start with a plausible stamp are counted as records but not as samples ("bad").
//
// With -stdin the app also takes records from its standard input, one value per line, with
// the same stamp rule: `latency_floor BROKERS TOPIC PARTITIONS | latency_app -stdin`
// (examples/latency_floor.rs, a plain librdkafka consumer) is the floor of the latency rows
// (producer → broker → librdkafka, no group, no HTTP) that every system's figure is compared
// against.
//
//	GET  /count         "<records> <requests>"
//	GET  /latency       "samples=N bad=B p50_us=.. p99_us=.. p999_us=.. max_us=.."
//	POST /reset-latency forget the samples so far (the warm-up), keep counting records
//
//	go build -o latency_app examples/latency_app.go && ./latency_app -listen 127.0.0.1:18090
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

const maxSamples = 10_000_000 // bounded memory: 80 MB at most

var (
	records, requests, bad atomic.Int64
	mu                     sync.Mutex
	samples                []int64 // latencies in ns
)

// stamp parses the leading decimal digits of b (at most 19) as Unix nanoseconds; 0 if none.
func stamp(b []byte) int64 {
	var v int64
	n := 0
	for n < len(b) && n < 19 && b[n] >= '0' && b[n] <= '9' {
		v = v*10 + int64(b[n]-'0')
		n++
	}
	if n < 19 {
		return 0
	}
	return v
}

func percentile(s []int64, q float64) float64 {
	if len(s) == 0 {
		return 0
	}
	i := int(q * float64(len(s)))
	if i >= len(s) {
		i = len(s) - 1
	}
	return float64(s[i]) / 1e3
}

func handle(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/count":
		fmt.Fprintf(w, "%d %d\n", records.Load(), requests.Load())
		return
	case r.Method == http.MethodGet && r.URL.Path == "/latency":
		mu.Lock()
		s := slices.Clone(samples)
		mu.Unlock()
		slices.Sort(s)
		var mx int64
		if len(s) > 0 {
			mx = s[len(s)-1]
		}
		fmt.Fprintf(w, "samples=%d bad=%d p50_us=%.0f p99_us=%.0f p999_us=%.0f max_us=%.0f\n",
			len(s), bad.Load(), percentile(s, 0.50), percentile(s, 0.99), percentile(s, 0.999), float64(mx)/1e3)
		return
	case r.Method == http.MethodPost && r.URL.Path == "/reset-latency":
		mu.Lock()
		samples = samples[:0]
		mu.Unlock()
		return
	case r.Method != http.MethodPost:
		http.Error(w, "POST records here; GET /count, GET /latency", http.StatusNotFound)
		return
	}
	now := time.Now().UnixNano()
	var head [19]byte
	n, _ := io.ReadFull(r.Body, head[:])
	_, _ = io.Copy(io.Discard, r.Body)
	sample(head[:n], now)
	requests.Add(1)
	w.WriteHeader(http.StatusOK)
}

// sample counts one record that arrived at `now` with the value prefix `head`.
func sample(head []byte, now int64) {
	if t := stamp(head); t > 0 && t <= now && now-t < int64(time.Hour) {
		mu.Lock()
		if len(samples) < maxSamples {
			samples = append(samples, now-t)
		}
		mu.Unlock()
	} else {
		bad.Add(1)
	}
	records.Add(1)
}

// readStdin samples every line of standard input (a line longer than the buffer counts once,
// by its first bytes) until EOF.
func readStdin() {
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	start := true
	for {
		line, err := in.ReadSlice('\n')
		now := time.Now().UnixNano()
		if len(line) > 0 {
			if start {
				sample(line, now)
			}
			start = line[len(line)-1] == '\n'
		}
		if err != nil && err != bufio.ErrBufferFull {
			if err != io.EOF {
				log.Printf("latency_app: stdin: %v", err)
			}
			return
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:18090", "listen address")
	fromStdin := flag.Bool("stdin", false, "also take records from standard input, one value per line")
	flag.Parse()
	if *fromStdin {
		go readStdin()
	}
	log.Printf("latency_app listening on http://%s", *listen)
	log.Fatal(http.ListenAndServe(*listen, http.HandlerFunc(handle)))
}
