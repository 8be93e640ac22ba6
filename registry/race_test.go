//go:build race

package registry

// raceEnabled shrinks the largest test blobs: under the race detector the
// garbage collector's stack scans make a 64 MiB in-memory blob take seconds.
const raceEnabled = true
