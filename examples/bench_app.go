// bench_app: the fastest possible app behind kafka-sidecar, for scripts/bench.sh.
// Go standard library only.
//
// Every POST is answered 200 at once and counted: one record in single mode, or the
// number of records in the JSON envelope in batch mode. GET /count returns
// "<records> <requests>". With -unix PATH it listens on that Unix domain socket instead of
// TCP (for the Unix-socket row of scripts/bench.sh --peers; a stale socket file is replaced).
//
//	go build -o bench_app examples/bench_app.go && ./bench_app -listen 127.0.0.1:18080
//	./bench_app -unix /tmp/app.sock
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
)

var (
	records  atomic.Int64
	requests atomic.Int64
	bufs     = sync.Pool{New: func() any { return new(bytes.Buffer) }}
	// Each record of a batch envelope has exactly one "offset" field (serde_json, compact).
	offsetField = []byte(`"offset":`)
)

func handle(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Path == "/count" {
		fmt.Fprintf(w, "%d %d\n", records.Load(), requests.Load())
		return
	}
	if r.Method != http.MethodPost {
		http.Error(w, "POST records here; GET /count", http.StatusNotFound)
		return
	}
	n := int64(1)
	if strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
		buf := bufs.Get().(*bytes.Buffer)
		buf.Reset()
		if _, err := buf.ReadFrom(r.Body); err != nil {
			bufs.Put(buf)
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		n = int64(bytes.Count(buf.Bytes(), offsetField))
		bufs.Put(buf)
	} else if _, err := io.Copy(io.Discard, r.Body); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	records.Add(n)
	requests.Add(1)
	w.WriteHeader(http.StatusOK)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:18080", "listen address")
	unix := flag.String("unix", "", "listen on this Unix domain socket instead of -listen")
	flag.Parse()
	if *unix != "" {
		_ = os.Remove(*unix) // a socket left by an earlier run
		l, err := net.Listen("unix", *unix)
		if err != nil {
			log.Fatal(err)
		}
		log.Printf("bench_app listening on unix:%s", *unix)
		log.Fatal(http.Serve(l, http.HandlerFunc(handle)))
	}
	log.Printf("bench_app listening on http://%s", *listen)
	log.Fatal(http.ListenAndServe(*listen, http.HandlerFunc(handle)))
}
