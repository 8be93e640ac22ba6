package proxy

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// genBlob is a large blob generated on the fly: block i is a fixed random
// MiB with i written over its first bytes.
type genBlob struct {
	base  []byte
	size  int64
	block int
}

func newGenBlob(size int64) *genBlob {
	g := &genBlob{size: size, block: 1 << 20, base: make([]byte, 1<<20)}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(g.base); i += 8 {
		binary.LittleEndian.PutUint64(g.base[i:], r.Uint64())
	}
	return g
}

func (g *genBlob) writeTo(w io.Writer) error {
	buf := make([]byte, g.block)
	for off, i := int64(0), uint64(0); off < g.size; i++ {
		copy(buf, g.base)
		binary.LittleEndian.PutUint64(buf, i)
		n := int64(len(buf))
		if g.size-off < n {
			n = g.size - off
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return err
		}
		off += n
	}
	return nil
}

func (g *genBlob) digest() string {
	h := sha256.New()
	g.writeTo(h)
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// TestStreamingMemoryIsFlat streams a 512 MiB blob through the proxy and
// samples the heap while it flows: growth must stay under 64 MiB (the
// client, the proxy and the generating upstream all run in this process,
// so all three must stream).
func TestStreamingMemoryIsFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("streams 512 MiB")
	}
	const size = 512 << 20
	g := newGenBlob(size)
	d := g.digest()
	up := fakeUpstream(t, false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		g.writeTo(w)
	})
	f := newPX(t)
	f.addSecret("acme", "up", hostOf(up), pxUser, pxCanary)
	tok := f.token("acme", ScopePull)

	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	var peak atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		var m runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				runtime.ReadMemStats(&m)
				if m.HeapAlloc > peak.Load() {
					peak.Store(m.HeapAlloc)
				}
			}
		}
	}()
	start := time.Now()
	resp := f.get("/v2/"+hostOf(up)+"/big/blobs/"+d, tok)
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	resp.Body.Close()
	close(stop)
	wg.Wait()
	if err != nil || n != size || "sha256:"+hex.EncodeToString(h.Sum(nil)) != d {
		t.Fatalf("streamed %d bytes, err %v", n, err)
	}
	growth := int64(peak.Load()) - int64(base.HeapAlloc)
	t.Logf("512 MiB in %s; heap %d MiB at start, peak growth %d MiB", time.Since(start).Round(time.Millisecond), base.HeapAlloc>>20, growth>>20)
	if growth > 64<<20 {
		t.Fatalf("heap grew by %d MiB while streaming (limit 64 MiB)", growth>>20)
	}
}
