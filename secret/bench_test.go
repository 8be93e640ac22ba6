package secret

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
)

// BenchmarkResolve is the in-process part of a helper `get`: open the store
// and resolve one of 100 secrets.
func BenchmarkResolve(b *testing.B) {
	ctx := context.Background()
	home := filepath.Join(b.TempDir(), "home")
	s, err := Open(home)
	if err != nil {
		b.Fatal(err)
	}
	for i := range 100 {
		sec := Secret{Name: fmt.Sprintf("s%03d", i), Kind: Basic, Registries: []Pattern{Pattern(fmt.Sprintf("reg%03d.example:5000/team", i))}}
		if _, err := s.Create(ctx, sec, Value{Username: "bot", Password: "pw"}); err != nil {
			b.Fatal(err)
		}
	}
	t, _ := ParseServerURL("reg050.example:5000/team/app")
	b.ReportAllocs()
	for b.Loop() {
		s, err := Open(home)
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := s.Resolve(ctx, "", t); err != nil {
			b.Fatal(err)
		}
	}
}
