// Package freeport finds a loopback TCP port that is free, for the servers
// that tests, the local cluster and the benchmarks start as processes.
package freeport

import (
	"fmt"
	"net"
)

// Get returns a port of 127.0.0.1 that was free a moment ago. Another
// process may take it before the caller listens: callers that can, retry.
func Get() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
