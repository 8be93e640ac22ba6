// Command floor is the baseline of the helper benchmark: the least a Go
// credential helper can do, print fixed JSON.
package main

import "os"

func main() {
	os.Stdout.WriteString(`{"ServerURL":"127.0.0.1:5000","Username":"bot","Secret":"floor"}` + "\n")
}
