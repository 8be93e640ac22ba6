package cache

import (
	"context"
	"io"
	"testing"
)

func BenchmarkExpCold(b *testing.B) {
	reg := startUpstream(b)
	d := seedBlob(b, reg, "bench/cold", benchSize, 92)
	c, _ := newTestCache(b)
	fetch := registryFetch(reg, "bench/cold", d, nil, nil)
	b.SetBytes(benchSize)
	for b.Loop() {
		b.StopTimer()
		waitCommitted(b, c, KindBlob, d)
		_ = c.deleteEntry(context.Background(), key{KindBlob, d})
		b.StartTimer()
		r, _ := c.Blob(context.Background(), d, fetch)
		r.WriteTo(io.Discard)
		r.Close()
	}
}
