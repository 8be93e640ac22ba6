package proxy

import (
	"io"
	"net/http"
	"testing"

	"github.com/pullsecret/pullsecret/registry"
)

// Proxy vs direct from the same in-process upstream (distribution v3,
// inmemory driver, htpasswd), same run:
//
//	go test ./proxy -run '^$' -bench ThroughProxy -benchtime 5x
func BenchmarkThroughProxy(b *testing.B) {
	up := pxUpstream(b, false)
	f := newPX(b, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	d, err := up.SeedBlob(f.ctx, "bench", 256<<20, registry.RandSeed(1))
	if err != nil {
		b.Fatal(err)
	}
	if _, err := up.SeedRandom(f.ctx, "bench", "v1"); err != nil {
		b.Fatal(err)
	}
	tok := f.token("acme", ScopePull)
	direct := func(r *http.Request) { r.SetBasicAuth(pxUser, pxCanary) }
	viaProxy := func(r *http.Request) { r.SetBasicAuth("ci", tok) }
	c := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	get := func(b *testing.B, url string, auth func(*http.Request)) int64 {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
		auth(req)
		resp, err := c.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("%s: %d %v", url, resp.StatusCode, err)
		}
		return n
	}
	for _, bc := range []struct {
		name, url string
		auth      func(*http.Request)
	}{
		{"blob-256MiB/direct", up.URL() + "/v2/bench/blobs/" + d.String(), direct},
		{"blob-256MiB/proxy", f.hs.URL + "/v2/up/bench/blobs/" + d.String(), viaProxy},
		{"manifest/direct", up.URL() + "/v2/bench/manifests/v1", direct},
		{"manifest/proxy", f.hs.URL + "/v2/up/bench/manifests/v1", viaProxy},
	} {
		b.Run(bc.name, func(b *testing.B) {
			get(b, bc.url, bc.auth) // warm connections and tokens
			b.ResetTimer()
			var n int64
			for i := 0; i < b.N; i++ {
				n = get(b, bc.url, bc.auth)
			}
			b.SetBytes(n)
		})
	}
}
