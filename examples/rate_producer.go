// rate_producer: paced input for kcat, for the latency rows of scripts/bench.sh --peers.
// Go standard library only.
//
// Writes -rate lines per second for -duration to stdout, each "k<i mod 10000>|<value>" where
// the value is the Unix time in nanoseconds (19 digits) at which the line is written, padded
// with letters to -size bytes. Pipe it into `kcat -P -K '|' -X linger.ms=5`: every line is
// flushed when it is due (pacing in 1 ms steps), so the stamp is the moment the record is
// handed to the producer, and examples/latency_app.go measures producer → broker → consumer
// → app. linger.ms=5 is librdkafka's default; with 0 every few records become a produce
// request of their own and at 6k records/s on two cores the producer's queue alone held
// them for p50 ~100 ms (stamp → the broker's LogAppendTime), where 5 gives ~4 ms.
//
//	go build -o rate_producer examples/rate_producer.go
//	./rate_producer -rate 10000 -duration 10s -size 1024 | kcat -P -b 127.0.0.1:9092 -t T -K '|' -X linger.ms=5
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"
)

func main() {
	rate := flag.Float64("rate", 1000, "records per second")
	duration := flag.Duration("duration", 10*time.Second, "how long to produce")
	size := flag.Int("size", 1024, "value size in bytes (at least 19)")
	flag.Parse()
	if *size < 19 || *rate <= 0 {
		fmt.Fprintln(os.Stderr, "rate_producer: -size must be >= 19 and -rate > 0")
		os.Exit(2)
	}
	pad := make([]byte, *size-19)
	for i := range pad {
		pad[i] = 'a' + byte(i%26)
	}
	out := bufio.NewWriterSize(os.Stdout, 1<<20)
	start := time.Now()
	var sent int64
	line := make([]byte, 0, *size+16)
	for {
		el := time.Since(start)
		if el >= *duration {
			break
		}
		due := int64(el.Seconds() * *rate)
		for ; sent < due; sent++ {
			line = line[:0]
			line = append(line, 'k')
			line = strconv.AppendInt(line, sent%10000, 10)
			line = append(line, '|')
			line = fmt.Appendf(line, "%019d", time.Now().UnixNano())
			line = append(line, pad...)
			line = append(line, '\n')
			if _, err := out.Write(line); err != nil {
				os.Exit(1)
			}
		}
		if err := out.Flush(); err != nil {
			os.Exit(1)
		}
		time.Sleep(time.Millisecond)
	}
	if err := out.Flush(); err != nil {
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "rate_producer: %d records in %s\n", sent, time.Since(start).Round(time.Millisecond))
}
